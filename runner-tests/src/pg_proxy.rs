//! A simulated transaction-pooling proxy (issue 16: `tether cluster check` must refuse one).
//!
//! What PgBouncer's `pool_mode=transaction` does to a client, reduced to its essence: the
//! client's session is not one server backend. For every client connection this proxy opens
//! **two** backend connections to the real server (over its unix socket, where the test server
//! trusts local users, so one startup message authenticates both), relays the startup to the
//! first and replays it to the second, then sends each *statement* — a simple `Query`, or an
//! extended-protocol batch up to its `Sync` — to the next backend in turn, relaying the answer
//! up to its `ReadyForQuery`. Two statements in a row therefore run on different backends,
//! which is exactly what a transaction pooler may do between transactions. It speaks the
//! PostgreSQL v3 wire protocol only as far as framing (type byte + length); it never looks
//! inside a message. Loopback only; it stops (and drops every connection) when dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The `SSLRequest` code of the startup packet.
const SSL_REQUEST: u32 = 80_877_103;

/// A running proxy; see the module doc.
pub struct PoolingProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl PoolingProxy {
    /// Listen on 127.0.0.1 (a free port) in front of the server whose unix socket is
    /// `<socket_dir>/.s.PGSQL.<port>`.
    pub fn start(socket_dir: &Path, server_port: u16) -> PoolingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the pooling proxy");
        let port = listener
            .local_addr()
            .expect("the pooling proxy's address")
            .port();
        let upstream = socket_dir.join(format!(".s.PGSQL.{server_port}"));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    // A broken connection just ends this client's session.
                    let _ = serve(client, &upstream);
                });
            }
        });
        PoolingProxy {
            port,
            stop,
            accept: Some(accept),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PoolingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// The untyped startup packet (length included).
fn read_startup(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = read_u32(r)? as usize;
    if !(8..=10_000).contains(&len) {
        return Err(io::Error::other("bad startup length"));
    }
    let mut msg = (len as u32).to_be_bytes().to_vec();
    msg.resize(len, 0);
    r.read_exact(&mut msg[4..])?;
    Ok(msg)
}

/// One typed message: its type byte and the whole message (type and length included).
fn read_msg(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut t = [0u8; 1];
    r.read_exact(&mut t)?;
    let len = read_u32(r)? as usize;
    if len < 4 {
        return Err(io::Error::other("bad message length"));
    }
    let mut msg = vec![t[0]];
    msg.extend_from_slice(&(len as u32).to_be_bytes());
    msg.resize(1 + len, 0);
    r.read_exact(&mut msg[5..])?;
    Ok((t[0], msg))
}

/// Relay (or, with `to: None`, drain) backend messages up to and including `ReadyForQuery`.
fn answer(backend: &mut UnixStream, mut to: Option<&mut TcpStream>) -> io::Result<()> {
    loop {
        let (t, msg) = read_msg(backend)?;
        if let Some(client) = to.as_deref_mut() {
            client.write_all(&msg)?;
        }
        if t == b'Z' {
            return Ok(());
        }
    }
}

fn serve(mut client: TcpStream, upstream: &PathBuf) -> io::Result<()> {
    let mut startup = read_startup(&mut client)?;
    if startup.len() == 8
        && u32::from_be_bytes([startup[4], startup[5], startup[6], startup[7]]) == SSL_REQUEST
    {
        client.write_all(b"N")?;
        startup = read_startup(&mut client)?;
    }
    let mut backends = [
        UnixStream::connect(upstream)?,
        UnixStream::connect(upstream)?,
    ];
    for b in &mut backends {
        b.write_all(&startup)?;
    }
    answer(&mut backends[0], Some(&mut client))?;
    answer(&mut backends[1], None)?;
    let mut next = 0;
    loop {
        let (t, msg) = read_msg(&mut client)?;
        if t == b'X' {
            for b in &mut backends {
                let _ = b.write_all(&msg);
            }
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        backends[next].write_all(&msg)?;
        if t == b'Q' || t == b'S' {
            answer(&mut backends[next], Some(&mut client))?;
            next = (next + 1) % backends.len();
        }
    }
}
