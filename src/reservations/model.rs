//! Values the API returns, and validated inputs ("parse, don't validate": a `NewResource` is valid).

use serde::Serialize;

use super::state::State;
use crate::time::{serde_rfc3339, Millis};

/// Something that can be reserved.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Resource {
    pub id: i64,
    pub name: String,
    pub capacity: i64,
    /// capacity − PAID − live RESERVED quantities; never negative.
    pub available: i64,
    pub price_cents: i64,
    pub currency: String,
    pub hold_seconds: i64,
}

/// A captured payment of a reservation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Payment {
    pub id: i64,
    pub amount_cents: i64,
    pub currency: String,
    pub provider_ref: String,
    #[serde(with = "serde_rfc3339")]
    pub captured_at: Millis,
    /// Set when the reservation was cancelled after payment and the amount refunded.
    #[serde(with = "serde_rfc3339::option")]
    pub refunded_at: Option<Millis>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reservation {
    pub id: i64,
    pub resource_id: i64,
    pub user_id: i64,
    pub quantity: i64,
    pub state: State,
    pub amount_cents: i64,
    pub currency: String,
    #[serde(with = "serde_rfc3339")]
    pub expires_at: Millis,
    #[serde(with = "serde_rfc3339")]
    pub created_at: Millis,
    #[serde(with = "serde_rfc3339")]
    pub updated_at: Millis,
    pub payment: Option<Payment>,
}

/// One entry of the append-only transition log.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Transition {
    pub from: Option<State>,
    pub to: State,
    #[serde(with = "serde_rfc3339")]
    pub at: Millis,
    pub cause: String,
}

/// A valid new resource. Construct with [`NewResource::parse`].
#[derive(Debug, Clone)]
pub struct NewResource {
    pub name: String,
    pub capacity: i64,
    pub price_cents: i64,
    pub currency: String,
    pub hold_seconds: i64,
}

/// A field that failed validation, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

/// Upper bound on capacity and quantities: far beyond any venue, small enough that sums never overflow.
pub const MAX_QUANTITY: i64 = 1_000_000_000;

impl NewResource {
    pub fn parse(
        name: &str,
        capacity: i64,
        price_cents: i64,
        currency: &str,
        hold_seconds: i64,
    ) -> Result<Self, FieldError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(FieldError::new("name", "must be 1 to 200 characters"));
        }
        if !(0..=MAX_QUANTITY).contains(&capacity) {
            return Err(FieldError::new(
                "capacity",
                format!("must be between 0 and {MAX_QUANTITY}"),
            ));
        }
        if !(0..=1_000_000_000_000).contains(&price_cents) {
            return Err(FieldError::new(
                "price_cents",
                "must be a non-negative integer (minor units)",
            ));
        }
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(FieldError::new(
                "currency",
                "must be an ISO 4217 code such as EUR",
            ));
        }
        if !(1..=30 * 24 * 3600).contains(&hold_seconds) {
            return Err(FieldError::new(
                "hold_seconds",
                "must be between 1 and 2592000 (30 days)",
            ));
        }
        Ok(NewResource {
            name: name.to_string(),
            capacity,
            price_cents,
            currency: currency.to_string(),
            hold_seconds,
        })
    }
}

/// Validates a requested quantity.
pub fn parse_quantity(q: i64) -> Result<i64, FieldError> {
    if (1..=MAX_QUANTITY).contains(&q) {
        Ok(q)
    } else {
        Err(FieldError::new("quantity", "must be a positive integer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_resource_rejects_bad_fields_by_name() {
        assert_eq!(
            NewResource::parse("", 1, 1, "EUR", 60).unwrap_err().field,
            "name"
        );
        assert_eq!(
            NewResource::parse("a", -1, 1, "EUR", 60).unwrap_err().field,
            "capacity"
        );
        assert_eq!(
            NewResource::parse("a", 1, -1, "EUR", 60).unwrap_err().field,
            "price_cents"
        );
        assert_eq!(
            NewResource::parse("a", 1, 1, "eur", 60).unwrap_err().field,
            "currency"
        );
        assert_eq!(
            NewResource::parse("a", 1, 1, "EUR", 0).unwrap_err().field,
            "hold_seconds"
        );
        assert!(NewResource::parse(" Gig ", 10, 2500, "EUR", 600).is_ok());
        assert_eq!(parse_quantity(0).unwrap_err().field, "quantity");
    }
}
