//! Integration test support (test box harness lives in tests/testbox).
