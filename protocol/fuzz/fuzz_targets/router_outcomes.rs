//! Bytes another node shares, as the import takes them: see
//! `mycel_protocol::fuzzing::router_outcomes`. Must return, never panic,
//! never allocate past the kind's cap.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mycel_protocol::fuzzing::router_outcomes(data);
});
