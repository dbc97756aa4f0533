//! Payments: the gateway seam and the built-in `sandbox` gateway.
//!
//! cozy never charges a card twice for one reservation because the key it hands the gateway is derived
//! from the reservation ([`charge_key`]), not from the HTTP request: every retry, by any client, with any
//! Idempotency-Key, asks the gateway for the same charge, and a gateway honours its own idempotency keys.

pub mod sandbox;

use futures::future::BoxFuture;

use crate::time::Millis;

pub use sandbox::SandboxGateway;

/// The gateway idempotency key of a reservation's charge.
pub fn charge_key(reservation_id: i64) -> String {
    format!("cozy-reservation-{reservation_id}")
}

/// What to charge.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub key: String,
    pub amount_cents: i64,
    pub currency: String,
    pub method: String,
}

/// A captured charge as the gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub provider_ref: String,
    pub amount_cents: i64,
    pub currency: String,
    pub captured_at: Millis,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The card was declined; nothing was charged.
    #[error("payment declined: {0}")]
    Declined(String),
    /// The gateway did not answer in time or failed; a charge may or may not exist. Retrying is safe.
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
}

/// A payment provider. Implementations must honour `ChargeRequest::key` idempotently: the same key never
/// produces a second charge and returns the first one.
pub trait Gateway: Send + Sync + 'static {
    /// Short provider name stored with each charge (`charges.provider`).
    fn name(&self) -> &'static str;
    /// Whether `method` is a payment method this gateway understands (else the API answers 422).
    fn accepts(&self, method: &str) -> bool;
    fn charge<'a>(&'a self, req: &'a ChargeRequest) -> BoxFuture<'a, Result<Charge, GatewayError>>;
    /// Refunds the charge made under `key`; idempotent. Returns the refund reference.
    fn refund<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, GatewayError>>;
    /// The charge made under `key`, if any (used to reconcile attempts interrupted by a crash).
    fn find<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Charge>, GatewayError>>;
}
