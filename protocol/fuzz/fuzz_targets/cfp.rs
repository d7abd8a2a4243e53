//! Bytes a peer can send, as one decoder takes them: see
//! `mycel_protocol::fuzzing::cfp`. Must return, never panic, never
//! allocate past the kind's cap.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mycel_protocol::fuzzing::cfp(data);
});
