//! A small HTTP/1.1 client for credential endpoints. (Being written.)
