//! Capabilities: all five sets emptied.

use std::io;

use crate::sys;

/// Drops every capability from the bounding set. Needs CAP_SETPCAP, so it runs before the
/// switch to the agent's uid (which empties the permitted and effective sets).
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
    // SAFETY: integer-only prctl.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the effective, permitted and inheritable sets.
pub fn clear_all() -> io::Result<()> {
    let hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    }; // _LINUX_CAPABILITY_VERSION_3
    let data = [CapData::default(); 2];
    // SAFETY: header and two data words as capset(2) version 3 expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Copies the permitted set into the effective set (after an effective-uid switch away from
/// 0 emptied it: the real and saved uids stay 0, so the permitted set is intact).
pub fn raise_effective() -> io::Result<()> {
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data words as capget(2) version 3 expects.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    for d in &mut data {
        d.effective = d.permitted;
    }
    // SAFETY: as above, for capset(2).
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
