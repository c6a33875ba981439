//! The binary's own commands that drive devices rather than serve them:
//! `furrow send` (one device, through the SDK), `furrow sim` (a fleet of
//! SDK devices), `furrow bench` (the load generator in `furrow-bench`),
//! and where their devices come from ([`fleet`]). They live in the binary,
//! not in the gateway library, so that the library uses neither the SDK
//! nor the load generator.

pub mod bench;
pub mod fleet;
pub mod send;
pub mod sim;
