//! Resources, reservations and payments: the product's core.
//!
//! - [`state`]: the pure state machine.
//! - [`model`]: the values the API shows (a `Reservation`, a `Resource`) and validated inputs.
//! - [`repo`]: the transactions that apply the state machine, guarded by conditional updates and the
//!   schema's constraints.
//! - [`audit`] and [`sweep`]: invariant checks and housekeeping straight from the database.

pub mod audit;
pub mod model;
pub mod repo;
pub mod state;
pub mod sweep;

pub use model::{NewResource, Payment, Reservation, Resource, Transition};
pub use repo::{ReservationError, Reservations};
pub use state::State;
