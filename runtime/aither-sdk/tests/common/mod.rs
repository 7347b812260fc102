//! A fake aitherd for the tests: the far end of a socketpair, with its own framing code (not
//! the SDK's), so that a framing bug cannot cancel itself out.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use serde_json::{json, Value};

/// Reads one frame by hand: `None` at a clean end of stream.
pub fn read_raw(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("fake daemon read: {e}"),
    }
    let len = u32::from_be_bytes(header) as usize;
    assert!(
        (1..=64 * 1024).contains(&len),
        "client sent a frame of {len} bytes"
    );
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).expect("frame payload");
    Some(payload)
}

/// Writes `payload` as one frame.
pub fn send_raw(stream: &mut UnixStream, payload: &[u8]) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    // The client may have gone away already (an error test); that is its business.
    let _ = stream.write_all(&frame);
}

pub fn send(stream: &mut UnixStream, reply: &Value) {
    send_raw(stream, reply.to_string().as_bytes());
}

pub fn ok(req: &Value) -> Value {
    json!({"id": req["id"], "ok": true})
}

pub fn err(req: &Value, code: &str, message: &str) -> Value {
    json!({"id": req["id"], "ok": false, "error": {"code": code, "message": message}})
}

/// Serves requests on `stream` until the client closes it, calling `respond` with each request
/// (which writes zero or more replies); returns every request received, in order.
pub fn spawn<F>(mut stream: UnixStream, mut respond: F) -> JoinHandle<Vec<Value>>
where
    F: FnMut(&Value, &mut UnixStream) + Send + 'static,
{
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while let Some(raw) = read_raw(&mut stream) {
            let req: Value = serde_json::from_slice(&raw).expect("client sent invalid JSON");
            assert!(req.is_object(), "a request is a JSON object: {req}");
            respond(&req, &mut stream);
            seen.push(req);
        }
        seen
    })
}

/// A daemon that accepts everything.
pub fn spawn_ok(stream: UnixStream) -> JoinHandle<Vec<Value>> {
    spawn(stream, |req, s| send(s, &ok(req)))
}

/// `program args...` started with `fd` as its descriptor 3 and `AITHER_FD=3`, the way aitherd
/// starts agents. `sh` moves the descriptor from stdin to 3 (`3<&0`), which needs no unsafe
/// `pre_exec`. Drop the returned `Command` before waiting for the fake daemon: it holds a copy
/// of the descriptor.
pub fn with_fd3(program: &str, args: &[&str], fd: OwnedFd) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" "$@" 3<&0 </dev/null"#)
        .arg(program)
        .args(args)
        .env("AITHER_FD", "3")
        .stdin(Stdio::from(fd))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}
