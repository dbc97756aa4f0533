//! The inventory (not written yet).
