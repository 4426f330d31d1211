pub mod config;
pub mod net;
pub mod protocol;
pub mod splice;
