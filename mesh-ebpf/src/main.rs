//! sockmesh's kernel programs. One file per hook; this file only declares them.
//!
//! Every hook fails open: whatever goes wrong, the application's syscall proceeds untouched
//! and the reason is counted in `SM_STATS`.
#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

mod colour;
mod connect;
mod getpeername;
mod getsockopt;
mod maps;
mod sk_lookup;
mod sk_msg;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves this unreachable; eBPF has no unwinding.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
