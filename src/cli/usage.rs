//! A command line clap refused, said in one line (issue 18, D35):
//! `tether: usage: <what is wrong> [(did you mean '…'?)] — see 'tether run --help'`, or one JSON
//! object with `--log-format json`; exit 125. clap's own message is several unprefixed lines
//! and, for a stray `-5`, suggests `'-- -5'` — which for `tether run` makes `-5` the command.
//! `--help` and `--version` are printed as clap prints them (stdout, exit 0).

use crate::output::LogFormat;
use clap::error::{ContextKind, ContextValue, Error, ErrorKind};
use serde_json::Value;
use std::ffi::OsString;
use std::path::PathBuf;

/// Print what clap found (help, version or a usage error) and return the exit code.
/// `cmd` is tether's command tree, `argv` the arguments clap was given.
pub(super) fn report(err: &Error, cmd: &clap::Command, argv: &[OsString]) -> i32 {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return 0;
    }
    let args: Vec<String> = argv
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    crate::output::set_format(format_of(&args));
    let help = format!("{} --help", command_path(cmd, &args).join(" "));
    let msg = format!("{} — see '{help}'", message(err, cmd, &args));
    crate::output::usage(&msg, &[("help", Value::from(help))]);
    crate::exit::TETHER_FAILURE
}

/// The arguments tether reads itself, before a `--` (what follows is the command's).
fn own_args(args: &[String]) -> &[String] {
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    &args[..end]
}

/// The last value given to `--name` (as `--name V` or `--name=V`), as clap would take it.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    let mut found = None;
    let mut it = own_args(args).iter();
    while let Some(a) = it.next() {
        if a == name {
            found = it.next().map(String::as_str);
        } else if let Some(v) = a.strip_prefix(&eq) {
            found = Some(v);
        }
    }
    found
}

/// The format a command line that did not parse asked for: `--log-format` on it, else the
/// config file's `log_format` (`--config`, `TETHER_CONFIG`, the default path) when that file
/// loads; text otherwise.
fn format_of(args: &[String]) -> LogFormat {
    if let Some(v) = flag_value(args, "--log-format") {
        return if v == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    let config = flag_value(args, "--config").map(PathBuf::from).or_else(|| {
        std::env::var_os("TETHER_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    crate::config::load(config.as_deref())
        .ok()
        .and_then(|c| c.log_format)
        .unwrap_or_default()
}

/// `tether`, `tether run`, `tether config check`: the subcommands named on the command line,
/// as far as they exist.
fn command_path(cmd: &clap::Command, args: &[String]) -> Vec<String> {
    let mut path = vec![cmd.get_name().to_owned()];
    let mut at = cmd;
    for a in own_args(args) {
        if a.starts_with('-') {
            continue;
        }
        match at.find_subcommand(a) {
            Some(sub) => {
                path.push(sub.get_name().to_owned());
                at = sub;
            }
            None => break,
        }
        if !at.has_subcommands() {
            break;
        }
    }
    path
}

/// clap's first paragraph on one line, without its `error: `, plus the did-you-mean suggestions
/// it found; never a tip to put something after `--`.
fn message(err: &Error, cmd: &clap::Command, args: &[String]) -> String {
    let mut msg = if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap would print the whole help; say what is missing instead.
        let path = command_path(cmd, args);
        let mut at = cmd;
        for name in &path[1..] {
            at = at.find_subcommand(name).unwrap_or(at);
        }
        let subs: Vec<&str> = at
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(clap::Command::get_name)
            .collect();
        format!(
            "'{}' needs a subcommand: {}",
            path.join(" "),
            subs.join(", ")
        )
    } else {
        first_paragraph(&err.render().to_string())
    };
    let mut similar = Vec::new();
    for kind in [
        ContextKind::SuggestedSubcommand,
        ContextKind::SuggestedArg,
        ContextKind::SuggestedValue,
    ] {
        match err.get(kind) {
            Some(ContextValue::String(s)) => similar.push(format!("'{s}'")),
            Some(ContextValue::Strings(v)) => similar.extend(v.iter().map(|s| format!("'{s}'"))),
            _ => {}
        }
    }
    if !similar.is_empty() {
        msg.push_str(&format!(" (did you mean {}?)", similar.join(" or ")));
    }
    if let Some(ContextValue::StyledStrs(tips)) = err.get(ContextKind::Suggested) {
        for tip in tips.iter().map(ToString::to_string) {
            // `use '-- -5'`: after `--` comes tether's command, not a value.
            if !tip.contains("-- ") {
                msg.push_str(&format!("; {tip}"));
            }
        }
    }
    if let Some(hint) = run_hint(err, args) {
        msg.push_str(hint);
    }
    msg
}

/// `error: the following required arguments were not provided:` + one indented line each →
/// `the following required arguments were not provided: --app <APP>, <COMMAND>...`.
fn first_paragraph(rendered: &str) -> String {
    let mut lines = rendered.lines().take_while(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default();
    let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    let rest: Vec<&str> = lines.map(str::trim).collect();
    if !rest.is_empty() {
        let sep = if msg.ends_with(':') { ", " } else { " " };
        msg.push(' ');
        msg.push_str(&rest.join(sep));
    }
    msg
}

const RUN_FORM: &str =
    "; the command goes after '--': tether run [OPTIONS] --app <DOMAIN> -- <COMMAND> [ARGS]...";

/// `tether run` with its command missing, or given without the `--` before it.
fn run_hint(err: &Error, args: &[String]) -> Option<&'static str> {
    if own_args(args).first().map(String::as_str) != Some("run") {
        return None;
    }
    let stray_word = matches!(
        err.get(ContextKind::InvalidArg),
        Some(ContextValue::String(a)) if !a.starts_with('-')
    );
    let no_command = err.kind() == ErrorKind::MissingRequiredArgument
        && err.to_string().lines().any(|l| l.trim() == "<COMMAND>...");
    (stray_word || no_command).then_some(RUN_FORM)
}
