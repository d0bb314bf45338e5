//! The cluster (issue 16): tether's connection to the PostgreSQL server that will hold the
//! cluster-wide app locks — one session on the calling thread (`session`, TLS in `tls`), the
//! schema `tether` (`schema`), and `tether cluster check` (`check`). Sits above `sys` and below
//! `state`, whose lock backend will use it.

pub(crate) mod check;
pub(crate) mod queue;
pub(crate) mod runs;
pub(crate) mod schema;
pub(crate) mod session;
mod tls;
