//! One handler per message family a device sends after WELCOME. A new
//! family (device state, firmware transfer) is a new file here and one arm
//! in [`super::machine::Machine::on_frame`].

mod commands;
pub mod firmware;
mod ping;
mod state;
mod telemetry;
