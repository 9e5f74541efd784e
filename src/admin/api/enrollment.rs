//! The API's enrollment endpoints: devices (list, approve) and enrollment tokens (list, create with a QR code,
//! revoke), over `enroll::admin` as the CLI uses it.

use super::*;

#[derive(Serialize)]
struct DeviceView {
    tenant: String,
    name: String,
    user: String,
    address: String,
    groups: Vec<String>,
    /// `config` | `enrolled` | `token`.
    origin: &'static str,
    /// `active` | `pending`.
    state: &'static str,
}

pub(super) fn devices(ctx: &Ctx, caller: &Caller) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let mut out = Vec::new();
    for t in cfg
        .tenants
        .iter()
        .filter(|t| caller.account.sees(t.id.as_str()))
    {
        for d in &t.devices {
            out.push(DeviceView {
                tenant: t.id.to_string(),
                name: d.name.to_string(),
                user: d.user.to_string(),
                address: d.address.to_string(),
                groups: d.groups.clone(),
                origin: match d.origin {
                    crate::config::DeviceOrigin::Config => "config",
                    crate::config::DeviceOrigin::Enrolled => "enrolled",
                    crate::config::DeviceOrigin::Token => "token",
                    crate::config::DeviceOrigin::Fleet => "fleet",
                },
                state: "active",
            });
        }
    }
    let pending =
        crate::enroll::admin::devices(&cfg.gateway.state_dir).map_err(ApiError::internal)?;
    for d in pending.into_iter().filter(|d| {
        d.state == crate::enroll::api::DeviceState::Pending
            && caller.account.sees(d.tenant.as_str())
    }) {
        out.push(DeviceView {
            tenant: d.tenant.to_string(),
            name: d.name.to_string(),
            user: d.user.to_string(),
            address: d.address.to_string(),
            groups: d.groups.clone(),
            origin: "token",
            state: "pending",
        });
    }
    Ok(json(StatusCode::OK, &serde_json::json!({ "items": out })))
}

#[derive(serde::Deserialize)]
pub(super) struct ApproveRequest {
    tenant: String,
    name: String,
}

fn enroll_audit(ctx: &Ctx) -> crate::enroll::audit::AuditLog {
    crate::enroll::audit::AuditLog::Pipeline(ctx.svc.enroll_audit.clone())
}

fn admin_error(e: crate::enroll::admin::AdminError) -> ApiError {
    use crate::enroll::admin::AdminError as E;
    match e {
        E::NoTenant(_) | E::NoToken(_) | E::NoDevice { .. } => {
            ApiError::new(ErrorCode::NotFound, e.to_string())
        }
        E::BadTokenId(_) | E::NotPending(_) | E::Ttl | E::Uses => {
            ApiError::new(ErrorCode::BadRequest, e.to_string())
        }
        other => ApiError::internal(other),
    }
}

pub(super) fn approve(ctx: &Ctx, caller: &Caller, body: &ApproveRequest) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    if !caller.account.sees(&body.tenant) {
        return Err(ApiError::not_found());
    }
    let now = crate::clock::unix_secs() as i64;
    crate::enroll::admin::approve_device(
        &cfg,
        &body.tenant,
        &body.name,
        &caller.actor(),
        now,
        &enroll_audit(ctx),
    )
    .map_err(admin_error)?;
    ctx.svc.audit.emit(
        AdminEvent::DeviceApproved,
        &caller.actor(),
        Some(&body.tenant),
        None,
        Some(caller.source),
        serde_json::json!({ "device": body.name }),
    );
    let applied = (ctx.svc.reload)();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "ok": true, "applied": applied.is_ok(), "message": applied.unwrap_or_else(|e| e) }),
    ))
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    tenant: String,
    user: Option<String>,
    groups: Vec<String>,
    max_uses: Option<u32>,
    used: u32,
    created_at: i64,
    expires_at: i64,
    preapproved: bool,
    state: &'static str,
    created_by: String,
    note: String,
}

fn token_view(t: &crate::enroll::store::TokenRow, now: i64) -> TokenView {
    TokenView {
        id: t.id.to_string(),
        tenant: t.tenant.to_string(),
        user: t.user.as_ref().map(|u| u.to_string()),
        groups: t.groups.clone(),
        max_uses: t.max_uses,
        used: t.used,
        created_at: t.created_at,
        expires_at: t.expires_at,
        preapproved: t.preapproved,
        state: t.state(now).as_str(),
        created_by: t.created_by.clone(),
        note: t.note.clone(),
    }
}

pub(super) fn tokens(ctx: &Ctx, caller: &Caller) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let now = crate::clock::unix_secs() as i64;
    let items: Vec<TokenView> =
        crate::enroll::admin::tokens_of(&cfg, ctx.svc.shared_enrollment.as_ref())
            .map_err(ApiError::internal)?
            .iter()
            .filter(|t| caller.account.sees(t.tenant.as_str()))
            .map(|t| token_view(t, now))
            .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "items": items })))
}

#[derive(serde::Deserialize)]
pub(super) struct TokenCreate {
    tenant: String,
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    max_uses: Option<u32>,
    ttl_secs: Option<u64>,
    #[serde(default)]
    pending: bool,
    #[serde(default)]
    note: String,
}

pub(super) fn create_token(
    ctx: &Ctx,
    caller: &Caller,
    body: TokenCreate,
) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    if !caller.account.sees(&body.tenant) {
        return Err(ApiError::not_found());
    }
    let user = body
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(crate::config::UserName::parse)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("user: {e}")))?;
    let now = crate::clock::unix_secs() as i64;
    let req = crate::enroll::admin::TokenRequest {
        tenant: body.tenant.clone(),
        user,
        groups: body.groups,
        max_uses: body.max_uses.or(Some(1)),
        ttl: std::time::Duration::from_secs(
            body.ttl_secs
                .unwrap_or(crate::enroll::admin::DEFAULT_TTL.as_secs()),
        ),
        ephemeral: None,
        preapproved: !body.pending,
        note: body.note.chars().take(200).collect(),
    };
    let t = crate::enroll::admin::create_token(
        &cfg,
        ctx.svc.shared_enrollment.as_ref(),
        req,
        &caller.actor(),
        now,
        &enroll_audit(ctx),
    )
    .map_err(admin_error)?;
    let url = crate::enroll::admin::listener_authority(&cfg).and_then(|authority| {
        let pins = crate::enroll::admin::listener_identity(&cfg).ok()?.pins;
        Some(crate::enroll::admin::enrollment_url(
            &authority,
            &pins.url_pin(),
            Some(&t.token),
        ))
    });
    let qr_svg = url.as_deref().and_then(qr_svg);
    ctx.svc.audit.emit(
        AdminEvent::TokenCreated,
        &caller.actor(),
        Some(&body.tenant),
        None,
        Some(caller.source),
        serde_json::json!({ "token": t.row.id.to_string() }),
    );
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({
            "token": t.token,
            "url": url,
            "qr_svg": qr_svg,
            "row": token_view(&t.row, now),
        }),
    ))
}

/// A QR code as a small SVG document (black modules as one path), for an `<img>` data URL.
pub(super) fn qr_svg(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    let w = code.width();
    let colors = code.to_colors();
    let mut d = String::new();
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            d += &format!("M{} {}h1v1h-1z", i % w + 4, i / w + 4);
        }
    }
    let size = w + 8;
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/><path fill=\"#000\" d=\"{d}\"/></svg>"
    ))
}

pub(super) fn revoke_token(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let tid = crate::enroll::admin::parse_token_id(id).map_err(admin_error)?;
    let row = crate::enroll::admin::tokens_of(&cfg, ctx.svc.shared_enrollment.as_ref())
        .map_err(ApiError::internal)?
        .into_iter()
        .find(|t| t.id == tid && caller.account.sees(t.tenant.as_str()))
        .ok_or_else(ApiError::not_found)?;
    let now = crate::clock::unix_secs() as i64;
    crate::enroll::admin::revoke_token(
        &cfg,
        ctx.svc.shared_enrollment.as_ref(),
        id,
        &caller.actor(),
        now,
        &enroll_audit(ctx),
    )
    .map_err(admin_error)?;
    ctx.svc.audit.emit(
        AdminEvent::TokenRevoked,
        &caller.actor(),
        Some(row.tenant.as_str()),
        None,
        Some(caller.source),
        serde_json::json!({ "token": row.id.to_string() }),
    );
    Ok(json(StatusCode::OK, &serde_json::json!({ "ok": true })))
}
