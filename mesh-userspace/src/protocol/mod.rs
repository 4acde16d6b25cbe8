//! Application protocols the proxy can recognise and parse: detection from the first bytes of a
//! connection, and frame codecs for SOFA Bolt and Dubbo 2 (with the Hessian2 subset Dubbo
//! request bodies need).
//!
//! Everything here is pure and self-contained (it uses only `bytes`, `tokio`, `tokio-util` and
//! `thiserror`, never another module of the daemon), so the fuzz crate in `mesh-userspace/fuzz`
//! can include these files with `#[path]` without turning the daemon into a library.
//!
//! - [`detect`]: `detect(prefix)` and `peek_detect(stream, timeout, hint)`.
//! - [`bolt`]: Bolt v1/v2 frames, `BoltCodec`, header map helpers, error responses.
//! - [`dubbo`]: Dubbo 2 frames, `DubboCodec`, request-body decoding, `add_attachment`, error
//!   responses.
//! - [`hessian2`]: a bounded Hessian2 reader (strings, ints, class definitions, skipping any
//!   value; Hessian 2.0 and the 2.0 draft the npm SOFA client writes) and the few writers the
//!   Dubbo code needs.
//! - [`sofa`]: the routing fields of a Bolt `SofaRequest` body (`methodName`,
//!   `targetServiceUniqueName`, string `requestProps`), bounded, without reading the arguments.
//!
//! Every error type has a `reason()`: a short, stable label for the per-reason counters.

pub mod bolt;
pub mod detect;
pub mod dubbo;
pub mod hessian2;
pub mod sofa;
