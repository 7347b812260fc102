//! The Python SDK (runtime/python/aither.py) against the same fixtures as the Rust types:
//! tests/python_fixtures.py plays aitherd with the fixture replies and checks the requests.

use std::path::Path;
use std::process::Command;

#[test]
fn python_sdk_speaks_the_fixtures() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(here.join("tests/python_fixtures.py"))
        .arg(here.join("fixtures"))
        .arg(here.join("../../runtime/python"))
        .arg(aither_proto::MAX_FRAME.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("this test needs python3 on PATH: {e}"));
    assert!(
        out.status.success(),
        "python_fixtures.py failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
}
