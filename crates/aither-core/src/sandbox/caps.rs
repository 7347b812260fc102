//! Capabilities: all five sets emptied, through the `caps` crate where it serves.

use std::io;

use ::caps::errors::CapsError;
use ::caps::CapSet;

use crate::sys;

/// `caps` reports failures as text only; keep its message as the error's source.
fn io_err(e: CapsError) -> io::Error {
    io::Error::other(e)
}

/// Drops every capability from the bounding set. Needs CAP_SETPCAP, so it runs before the
/// switch to the agent's uid (which empties the permitted and effective sets).
///
/// Raw prctl, not `caps::clear(None, CapSet::Bounding)`: that walks only the capabilities the
/// crate knows (up to CAP_CHECKPOINT_RESTORE, 40), so a newer kernel's capability would stay
/// in the bounding set; this loop drops up to the kernel's own last one (EINVAL past it).
pub fn drop_bounding() -> io::Result<()> {
    for cap in 0..=63 {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap) {
            Ok(()) => {}
            // Past the kernel's last capability.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Clears the ambient set (it would survive execve otherwise).
pub fn clear_ambient() -> io::Result<()> {
    ::caps::clear(None, CapSet::Ambient).map_err(io_err)
}

/// Empties the effective, permitted and inheritable sets. `caps::clear` zeroes whole 32-bit
/// words, so capabilities newer than the crate are cleared too.
pub fn clear_all() -> io::Result<()> {
    // Clearing the permitted set clears the effective set with it.
    ::caps::clear(None, CapSet::Permitted).map_err(io_err)?;
    ::caps::clear(None, CapSet::Inheritable).map_err(io_err)
}

/// Copies the permitted set into the effective set (after an effective-uid switch away from
/// 0 emptied it: the real and saved uids stay 0, so the permitted set is intact).
pub fn raise_effective() -> io::Result<()> {
    let permitted = ::caps::read(None, CapSet::Permitted).map_err(io_err)?;
    ::caps::set(None, CapSet::Effective, &permitted).map_err(io_err)
}
