//! The README, run as a new user would run it: every `sh` block of the
//! quick start, API, simulator, benchmark and TLS sections, read from
//! README.md itself (not a copy) and run in order, in one shell, in a
//! fresh directory, against the real `furrow` binary; then what the README
//! says each command shows is checked. An edit that breaks a command, or
//! makes the text promise what the program does not do, fails here.
//!
//! Two things stand in for a person: `cargo` is a function that does
//! nothing (this test's own build is the binary, linked where the README's
//! `export PATH` looks for it), and `furrow serve`, which a person runs in
//! a terminal of its own, starts in the background (stopping the one
//! before it, as the README's Ctrl-C does) and returns once `/readyz`
//! answers. The README's fixed ports (7700, 7701, 7780) must be free.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Sections whose `sh` blocks are run, in README order. Every other
/// section's blocks must be listed in `NOT_RUN` with the reason.
const RUN: &[&str] = &[
    "Quick start",
    "The operator's API and metrics",
    "Devices: the SDK and the fleet simulator",
    "Benchmarks: `furrow bench`",
    "TLS and mutual TLS",
];
/// Sections whose blocks are not run here.
const NOT_RUN: &[(&str, &str)] = &[("Tests", "runs this test")];

/// A fenced `sh` block and the `##` section it stands in.
struct Block {
    section: String,
    lines: Vec<String>,
}

fn sh_blocks(readme: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        if let Some(lines) = current.as_mut() {
            if line.trim_start().starts_with("```") {
                out.push(Block {
                    section: section.clone(),
                    lines: current.take().unwrap_or_default(),
                });
            } else {
                lines.push(line.to_owned());
            }
        } else if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_owned();
        } else if line.trim() == "```sh" {
            current = Some(Vec::new());
        }
    }
    assert!(current.is_none(), "README.md has an unclosed ```sh block");
    out
}

/// A block's commands: continuation lines joined, comments and blank
/// lines dropped (a trailing `# comment` stays: bash ignores it).
fn commands(block: &Block) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in &block.lines {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(t);
                out.push(std::mem::take(&mut pending));
            }
        }
    }
    assert!(pending.is_empty(), "a block ends in a continuation");
    out
}

/// What stands in for the person at the keyboard (see the module doc).
const PRELUDE: &str = r#"
exec 2>&1
set -euo pipefail
cargo() { echo "(readme test: 'cargo $*' is this test's own build)"; }
GW_PID=
stop_gateway() {
    if [ -n "$GW_PID" ]; then
        kill -INT "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" || true
        GW_PID=
    fi
}
trap stop_gateway EXIT
furrow() {
    if [ "${1:-}" != serve ]; then
        command furrow "$@"
        return
    fi
    stop_gateway
    echo "(readme test: furrow $* runs in the background; its log: gateway.log)"
    command furrow "$@" >>gateway.log 2>&1 &
    GW_PID=$!
    for _ in $(seq 300); do
        if ! kill -0 "$GW_PID" 2>/dev/null; then
            echo "furrow serve exited:"; tail -20 gateway.log; return 1
        fi
        curl -sf -o /dev/null localhost:7780/readyz && return 0
        sleep 0.1
    done
    echo "furrow serve not ready within 30 s"; return 1
}
"#;

/// The marker printed before each command's output.
const MARK: &str = "@@readme-command ";

/// One command as run, with everything it printed (stdout and stderr).
struct Ran {
    section: String,
    command: String,
    output: String,
}

/// Runs the blocks in one shell in `dir`; returns each command's output.
/// Panics, with the log so far, when a command fails.
fn run_blocks(dir: &Path, blocks: &[(&Block, Vec<String>)]) -> Vec<Ran> {
    let mut script = String::from(PRELUDE);
    let mut index = Vec::new();
    for (block, cmds) in blocks {
        for c in cmds {
            script.push_str(&format!("echo '{MARK}{}'\n{c}\necho\n", index.len()));
            index.push((block.section.clone(), c.clone()));
        }
    }
    script.push_str("stop_gateway\n");
    std::fs::write(dir.join("readme.sh"), &script).expect("write the script");
    let out = Command::new("bash")
        .arg("readme.sh")
        .current_dir(dir)
        .env_remove("FURROW_API__TOKEN")
        .env_remove("FURROW_DATABASE_URL")
        .env("NO_COLOR", "1")
        .output()
        .expect("run bash");
    // The prelude sends stderr to stdout, so each command's output is in
    // order under its marker.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut ran: Vec<Ran> = Vec::new();
    let mut before = String::new();
    for chunk in text.split(MARK) {
        if before.is_empty() && ran.is_empty() && !chunk.starts_with(char::is_numeric) {
            before = chunk.to_owned();
            continue;
        }
        let (n, output) = chunk.split_once('\n').unwrap_or((chunk, ""));
        let n: usize = n.trim().parse().expect("a command number");
        let (section, command) = index[n].clone();
        ran.push(Ran {
            section,
            command,
            output: output.to_owned(),
        });
    }
    if !out.status.success() {
        let gateway = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
        let last = ran.last().map_or("(none)", |r| r.command.as_str());
        panic!(
            "a README command failed ({}): {last}\n--- output ---\n{text}\n--- gateway log (tail) ---\n{}",
            out.status,
            tail(&gateway, 40)
        );
    }
    assert_eq!(ran.len(), index.len(), "every command ran:\n{text}");
    ran
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The one command containing `needle` (its output); exactly `count` must.
fn outputs<'a>(ran: &'a [Ran], needle: &str, count: usize) -> Vec<&'a Ran> {
    let found: Vec<&Ran> = ran.iter().filter(|r| r.command.contains(needle)).collect();
    assert_eq!(
        found.len(),
        count,
        "README commands containing {needle:?}: {:?}",
        found.iter().map(|r| &r.command).collect::<Vec<_>>()
    );
    found
}

fn one<'a>(ran: &'a [Ran], needle: &str) -> &'a Ran {
    outputs(ran, needle, 1)[0]
}

fn json(r: &Ran) -> Value {
    serde_json::from_str(r.output.trim())
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", r.command, r.output))
}

/// `sim: N devices for D s (...): sent S (...), acked A (...), rejected R,
/// unacknowledged U, reconnects C, errors E` as numbers by name.
fn sim_summary(r: &Ran) -> std::collections::HashMap<String, f64> {
    let line = r
        .output
        .lines()
        .find(|l| l.starts_with("sim: "))
        .unwrap_or_else(|| panic!("{}: no summary in {}", r.command, r.output));
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':' || c == '(')
        .filter(|w| !w.is_empty())
        .collect();
    let mut m = std::collections::HashMap::new();
    for pair in words.windows(2) {
        if let Ok(v) = pair[1].parse::<f64>() {
            m.entry(pair[0].to_owned()).or_insert(v);
        }
        if let Ok(v) = pair[0].parse::<f64>() {
            m.entry(format!("{}_n", pair[1])).or_insert(v);
        }
    }
    m
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

#[test]
fn the_readme_works_as_written() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let blocks = sh_blocks(&readme);
    for b in &blocks {
        assert!(
            RUN.contains(&b.section.as_str()) || NOT_RUN.iter().any(|(s, _)| *s == b.section),
            "README section {:?} has an sh block this test neither runs nor skips on purpose",
            b.section
        );
    }
    for s in RUN {
        assert!(
            blocks.iter().any(|b| b.section == *s),
            "README section {s:?} has no sh block any more"
        );
    }
    for port in [7700, 7701, 7780] {
        assert!(
            port_is_free(port),
            "the README's port {port} is taken: stop what holds it to run this test"
        );
    }

    // The simulator block runs twice: a second run on the same data
    // directory must work (it reuses its devices).
    let mut plan: Vec<(&Block, Vec<String>)> = Vec::new();
    for b in blocks.iter().filter(|b| RUN.contains(&b.section.as_str())) {
        let cmds = commands(b);
        let sim_block = cmds
            .iter()
            .any(|c| c.starts_with("furrow sim --addr 127.0.0.1"));
        plan.push((b, cmds.clone()));
        if sim_block {
            plan.push((b, cmds));
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("target/release");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_furrow"), bin.join("furrow"))
        .expect("link the binary");
    let ran = run_blocks(dir.path(), &plan);

    // Quick start: ten readings acknowledged, then listed with last_seq 10.
    let send = one(&ran, "furrow send pump-17");
    assert!(send.output.contains("<- WELCOME"), "{}", send.output);
    assert!(send.output.contains("<- ACK 10"), "{}", send.output);
    assert!(
        send.output
            .contains("10 readings stored and acknowledged (seq 1..10)"),
        "{}",
        send.output
    );
    let list = one(&ran, "furrow device list");
    let row = list
        .output
        .lines()
        .find(|l| l.split_whitespace().next() == Some("pump-17"))
        .unwrap_or_else(|| panic!("pump-17 not listed: {}", list.output));
    assert_eq!(row.split_whitespace().nth(1), Some("10"), "{row}");
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(
        log.contains("database=sqlite:") && log.contains("furrow-data/furrow.db"),
        "the start-up log names the database: {}",
        tail(&log, 40)
    );

    // The API: what furrow send stored, a device made and revoked.
    let d = json(one(&ran, "localhost:7780/v1/devices/pump-17 "));
    assert_eq!(
        (d["last_seq"].as_u64(), d["online"].as_bool()),
        (Some(10), Some(false)),
        "{d}"
    );
    let t = json(one(&ran, "pump-17/telemetry?from_seq=1"));
    let readings = t["readings"].as_array().expect("readings");
    assert_eq!(readings.len(), 10, "{t}");
    assert_eq!(
        readings[0]["payload"]["n"], 0,
        "JSON comes back as JSON: {t}"
    );
    let created = json(one(&ran, r#"-d '{"device_id":"pump-18"}'"#));
    let token = created["token"].as_str().unwrap_or_default();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{created}"
    );
    let revoked = json(one(&ran, "pump-18/revoke"));
    assert!(revoked.get("error").is_none(), "{revoked}");
    let doc = json(one(&ran, "openapi.json"));
    assert!(doc["paths"]["/v1/devices"].is_object(), "every route");

    // Firmware: one image signed by the gateway, one signed elsewhere with
    // the same key; both listed.
    let hex = |v: &Value, n: usize| {
        v.as_str()
            .is_some_and(|s| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let keygen = one(&ran, "furrow firmware keygen");
    assert!(
        hex(&Value::from(keygen.output.trim()), 64),
        "{}",
        keygen.output
    );
    let by_gateway = json(one(&ran, "version=2.1.0&model=p7'"));
    assert!(
        hex(&by_gateway["id"], 64) && hex(&by_gateway["signature"], 128),
        "{by_gateway}"
    );
    assert_eq!(by_gateway["size"], 300_000, "{by_gateway}");
    let elsewhere = json(one(&ran, "signature=$SIG"));
    assert_eq!(elsewhere["version"], "2.2.0", "{elsewhere}");
    let listed = json(one(&ran, "localhost:7780/v1/firmware "));
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

    // The simulator, twice: 100 devices x 2/s x 10 s = 2,000 readings each
    // time, all acknowledged; the second run reuses the devices.
    let sims = outputs(&ran, "furrow sim --addr 127.0.0.1", 2);
    for (i, r) in sims.iter().enumerate() {
        let m = sim_summary(r);
        assert_eq!(m.get("sent"), Some(&2000.0), "run {i}: {}", r.output);
        assert_eq!(m.get("acked"), Some(&2000.0), "run {i}: {}", r.output);
        assert_eq!(m.get("errors"), Some(&0.0), "run {i}: {}", r.output);
        assert_eq!(m.get("for"), Some(&10.0), "run {i}: {}", r.output);
    }
    assert!(
        sims[1]
            .output
            .contains("reusing 100 of the 100 devices sim-0.."),
        "{}",
        sims[1].output
    );

    // The benchmark: every device connected, throughput and the server's
    // CPU per message measured, no errors, the report and chart written.
    let bench = one(&ran, "furrow bench flat");
    for needle in [
        "connect    100/100",
        "msg/s acknowledged",
        "us of CPU per message",
        "errors     none",
    ] {
        assert!(
            bench.output.contains(needle),
            "{needle:?} in {}",
            bench.output
        );
    }
    for f in ["report.json", "report.svg"] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }

    // TLS: the certificates, then two devices over mutual TLS.
    for f in [
        "certs/ca.pem",
        "certs/server.pem",
        "certs/devices/sim-1.key",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} made");
    }
    let tls = one(&ran, "furrow sim --addr localhost:7701");
    let m = sim_summary(tls);
    assert_eq!(m.get("devices_n"), Some(&2.0), "{}", tls.output);
    assert!(m.get("sent").is_some_and(|s| *s >= 2.0), "{}", tls.output);
    assert_eq!(m.get("sent"), m.get("acked"), "{}", tls.output);
    assert_eq!(m.get("errors"), Some(&0.0), "{}", tls.output);
    assert_eq!(m.get("reconnects"), Some(&0.0), "{}", tls.output);
    assert!(
        ran.iter().all(|r| !r.section.is_empty()),
        "every command belongs to a section"
    );
}
