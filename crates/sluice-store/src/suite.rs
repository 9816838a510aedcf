//! The conformance suite every backend must pass. A backend's test file calls
//! `sluice_store::store_suite!(async { make_store().await })` and gets one test per case.
