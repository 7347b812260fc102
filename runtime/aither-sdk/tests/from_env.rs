//! `Channel::from_env`, in its own test binary: it reads the environment and takes ownership
//! of a descriptor, so it must not race other tests.

mod common;

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;

use aither_sdk::{Channel, SdkError};

#[test]
fn from_env_checks_the_variable_then_takes_the_fd_once() {
    std::env::remove_var("AITHER_FD");
    let e = Channel::from_env().unwrap_err();
    assert!(matches!(e, SdkError::NotUnderAitherd));
    assert_eq!(
        e.to_string(),
        "not running under aitherd (AITHER_FD is not set)"
    );

    for bad in ["", "three", "-1", "3.0"] {
        std::env::set_var("AITHER_FD", bad);
        assert!(
            matches!(Channel::from_env(), Err(SdkError::BadFdVar(v)) if v == bad),
            "{bad:?}"
        );
    }

    std::env::set_var("AITHER_FD", "987654");
    assert!(matches!(
        Channel::from_env(),
        Err(SdkError::FdNotOpen(987654))
    ));

    let file = std::fs::File::open("/dev/null").unwrap();
    let file_fd = file.into_raw_fd();
    std::env::set_var("AITHER_FD", file_fd.to_string());
    let e = Channel::from_env().unwrap_err();
    assert!(
        matches!(&e, SdkError::NotASocket { target, .. } if target == "/dev/null"),
        "{e:?}"
    );

    let (ours, theirs) = UnixStream::pair().unwrap();
    std::env::set_var("AITHER_FD", ours.into_raw_fd().to_string());
    let daemon = common::spawn_ok(theirs);
    let channel = Channel::from_env().unwrap();
    channel.ready().unwrap();
    assert!(matches!(Channel::from_env(), Err(SdkError::AlreadyTaken)));
    drop(channel);
    assert_eq!(daemon.join().unwrap().len(), 1);
}
