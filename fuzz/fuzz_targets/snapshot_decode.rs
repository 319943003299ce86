#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| allocation_ledger_fuzz::snapshot_decode(data));
