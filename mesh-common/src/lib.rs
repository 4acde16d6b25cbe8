//! The contract between sockmesh's kernel programs (`mesh-ebpf`) and its daemon
//! (`mesh-userspace`).
//!
//! Everything that crosses a BPF map is defined here once: `#[repr(C)]` structs of fixed-width
//! integers with explicit padding, byte order spelled in field names, size and offset asserts,
//! the map names, and an [`ABI_VERSION`] the daemon writes into the config map. The pure decisions
//! the hooks take (capture this connect? redirect this message?) are plain functions here so host
//! unit tests exercise them without a kernel.
//!
//! With the `user` feature the types implement `aya::Pod` for the daemon.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod accel;
pub mod addr;
pub mod colour;
pub mod config;
pub mod connect;
pub mod flow;
pub mod inbound;
pub mod maps;
pub mod pods;
pub mod service;
pub mod stats;

/// Bumped whenever a shared type or map changes shape. The daemon writes it into
/// [`config::MeshConfig::abi_version`]; hooks that see another value do nothing (fail open).
pub const ABI_VERSION: u32 = 4;

/// `AF_INET` / `AF_INET6` as the kernel defines them on Linux.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Socket type and protocol values the hooks compare against.
pub const SOCK_STREAM: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;

/// `SOL_IP`, `SOL_IPV6` and netfilter's `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` (both 80).
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const SO_ORIGINAL_DST: i32 = 80;
pub const IP6T_SO_ORIGINAL_DST: i32 = 80;

/// Default ports inside each enrolled pod's network namespace.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// The `SO_MARK` the daemon puts on its own upstream sockets; the hooks never capture them.
pub const DEFAULT_DAEMON_MARK: u32 = 0x534d_0001;

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for every type that crosses a map (userspace only).
    use super::*;

    unsafe impl aya::Pod for config::MeshConfig {}
    unsafe impl aya::Pod for pods::PodInfo {}
    unsafe impl aya::Pod for flow::ConnTuple {}
    unsafe impl aya::Pod for flow::OrigDst {}
    unsafe impl aya::Pod for accel::FlowState {}
    unsafe impl aya::Pod for inbound::InboundKey {}
    unsafe impl aya::Pod for inbound::InboundTarget {}
    unsafe impl aya::Pod for colour::InboundColourKey {}
    unsafe impl aya::Pod for colour::Ledger {}
    unsafe impl aya::Pod for service::SvcKey {}
    unsafe impl aya::Pod for service::SvcEntry {}
    unsafe impl aya::Pod for service::SvcEndpoint {}
}
