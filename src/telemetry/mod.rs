//! Telemetry beyond logs and `/metrics`: OpenTelemetry export, in builds
//! with the cargo feature `otel` ([`otel`]).

#[cfg(feature = "otel")]
pub mod otel;

/// In a build without `otel`: a note when the environment asks for
/// OpenTelemetry export, which this build cannot do (better said once at
/// startup than left for an operator to wonder why no trace arrives).
#[cfg(not(feature = "otel"))]
pub fn note_unsupported(env: &std::collections::HashMap<String, String>) {
    let asked = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .find(|name| env.get(**name).is_some_and(|v| !v.trim().is_empty()));
    if let Some(name) = asked {
        tracing::warn!(variable = name, "OpenTelemetry export asked for, but this keyhole was built without the cargo feature otel: nothing is exported");
    }
}
