//! SSH transport on russh (not written yet).
