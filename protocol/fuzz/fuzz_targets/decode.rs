//! Every decoder, on arbitrary bytes: must return, never panic, never
//! allocate past its message kind's cap.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mycel_protocol::fuzzing::decode_every_kind(data);
});
