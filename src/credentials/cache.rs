//! The token cache. (Being written.)

/// One token per (endpoint, user). (Being written.)
pub struct TokenCache;
