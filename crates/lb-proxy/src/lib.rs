//! The `lb` HTTP forwarder: a hyper 1.x server and pooled client that drive
//! [`lb_core::Balancer`] for every request.
//!
//! Not built yet: this crate is filled by the lb-proxy issue. It holds no code until then,
//! so nothing here pretends to forward.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub use lb_core::Balancer;
