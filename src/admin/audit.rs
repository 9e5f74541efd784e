//! The review UI's audit records (sign-ins, reads of recordings, live views, terminations, token and device
//! changes) into the one pipeline (`audit::admin_records`).
#![deny(unsafe_code)]

use std::net::IpAddr;

use crate::audit::admin_records::{AdminAuditSink, AdminEvent, AdminRecord};

#[derive(Clone)]
pub struct AdminAudit {
    sink: AdminAuditSink,
}

impl AdminAudit {
    pub fn new(sink: AdminAuditSink) -> AdminAudit {
        AdminAudit { sink }
    }

    pub fn login(&self, name: &str, source: IpAddr, ok: bool, reason: Option<&str>) {
        self.emit(
            if ok {
                AdminEvent::LoginSucceeded
            } else {
                AdminEvent::LoginFailed
            },
            name,
            None,
            None,
            Some(source),
            serde_json::json!({ "reason": reason }),
        );
    }

    pub fn emit(
        &self,
        event: AdminEvent,
        actor: &str,
        tenant: Option<&str>,
        session_id: Option<&str>,
        source: Option<IpAddr>,
        detail: serde_json::Value,
    ) {
        // Names typed at the sign-in form are attacker-chosen: bounded before they are stored.
        let actor: String = actor.chars().take(64).collect();
        self.sink.emit(AdminRecord {
            at_ms: crate::clock::unix_ms(),
            event,
            actor,
            tenant: tenant.map(str::to_owned),
            session_id: session_id.map(str::to_owned),
            source: source.map(|s| s.to_string()),
            detail,
        });
    }
}
