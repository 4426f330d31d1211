//! Limits on what a server may send that carries no application data, as
//! rustls keeps them during the handshake: empty records, warning alerts,
//! key updates and (TLS 1.2) renegotiation requests each cost keyhole work
//! and give the client nothing, so a server that sends only those is cut
//! instead of being served forever. No I/O here.

/// Consecutive records with no application data in them.
pub const MAX_EMPTY_RECORDS: u32 = 32;
/// Warning alerts (user_canceled) in the whole connection.
pub const MAX_WARNING_ALERTS: u32 = 4;
/// Key updates between two records of application data.
pub const MAX_KEY_UPDATES: u32 = 32;
/// TLS 1.2 HelloRequests (renegotiation, which keyhole declines by
/// ignoring) in the whole connection.
pub const MAX_HELLO_REQUESTS: u32 = 1;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Temper {
    empty_records: u32,
    warning_alerts: u32,
    key_updates: u32,
    hello_requests: u32,
}

impl Temper {
    /// A record of application data with `len` bytes in it.
    pub fn data(&mut self, len: usize) -> Result<(), String> {
        if len > 0 {
            self.empty_records = 0;
            self.key_updates = 0;
            return Ok(());
        }
        self.empty_records += 1;
        limit(
            self.empty_records,
            MAX_EMPTY_RECORDS,
            "empty TLS records in a row",
        )
    }

    pub fn warning_alert(&mut self) -> Result<(), String> {
        self.warning_alerts += 1;
        limit(
            self.warning_alerts,
            MAX_WARNING_ALERTS,
            "TLS warning alerts",
        )
    }

    pub fn key_update(&mut self) -> Result<(), String> {
        self.key_updates += 1;
        limit(
            self.key_updates,
            MAX_KEY_UPDATES,
            "TLS key updates without data between them",
        )
    }

    pub fn hello_request(&mut self) -> Result<(), String> {
        self.hello_requests += 1;
        limit(
            self.hello_requests,
            MAX_HELLO_REQUESTS,
            "TLS renegotiation requests",
        )
    }
}

fn limit(count: u32, max: u32, what: &str) -> Result<(), String> {
    if count > max {
        Err(format!(
            "the server sent more than {max} {what}; keyhole closes a connection that carries only those"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_records_are_allowed_up_to_the_limit_and_reset_by_data() {
        let mut t = Temper::default();
        for _ in 0..MAX_EMPTY_RECORDS {
            t.data(0).expect("within the limit");
        }
        let e = t.data(0).expect_err("one too many");
        assert!(e.contains("more than 32 empty TLS records in a row"), "{e}");
        let mut t = Temper::default();
        for _ in 0..10 * MAX_EMPTY_RECORDS {
            t.data(0).expect("empty");
            t.data(5).expect("data resets the count");
        }
    }

    #[test]
    fn key_updates_reset_by_data_warnings_and_hello_requests_do_not() {
        let mut t = Temper::default();
        for _ in 0..MAX_KEY_UPDATES {
            t.key_update().expect("within the limit");
        }
        t.data(1).expect("data");
        for _ in 0..MAX_KEY_UPDATES {
            t.key_update().expect("a fresh allowance after data");
        }
        assert!(t.key_update().is_err());
        for _ in 0..MAX_WARNING_ALERTS {
            t.warning_alert().expect("within the limit");
        }
        t.data(1).expect("data");
        assert!(t
            .warning_alert()
            .expect_err("fifth")
            .contains("warning alerts"));
        t.hello_request().expect("the first is ignored");
        assert!(t.hello_request().is_err());
    }
}
