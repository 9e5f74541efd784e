//! Per-source rate limit of the enrollment listener: GCRA (a token bucket without a timer) keyed by source
//! address, IPv6 by its /64 (one host owns a whole /64). Time is passed in.
//!
//! Memory is bounded: past `MAX_KEYS` sources, entries whose bucket is full again are forgotten, and if that
//! is not enough the table starts over (a flood from that many sources is not stopped by a per-source
//! limit anyway; the token lockout still holds).
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const MAX_KEYS: usize = 65_536;

pub struct RateLimiter {
    /// Time one request "costs" (a minute divided by the rate).
    interval: Duration,
    /// How far ahead of now a source may run (`interval * (burst - 1)`).
    tolerance: Duration,
    /// Theoretical arrival time of each source's next request.
    tat: HashMap<IpAddr, Instant>,
}

impl RateLimiter {
    /// `per_minute` sustained requests per source, bursts of up to `burst`.
    pub fn new(per_minute: u32, burst: u32) -> RateLimiter {
        let interval = Duration::from_secs(60) / per_minute.max(1);
        RateLimiter {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            tat: HashMap::new(),
        }
    }

    /// Counts one request from `source`; `Err(wait)` if it is over its limit (nothing counted then).
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = bucket_key(source);
        if self.tat.len() >= MAX_KEYS && !self.tat.contains_key(&key) {
            self.tat.retain(|_, t| *t > now);
            if self.tat.len() >= MAX_KEYS {
                self.tat.clear();
            }
        }
        let tat = self.tat.get(&key).copied().unwrap_or(now).max(now);
        let allowed_from = tat.checked_sub(self.tolerance).unwrap_or(now);
        if allowed_from > now {
            return Err(allowed_from - now);
        }
        self.tat.insert(key, tat + self.interval);
        Ok(())
    }
}

fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_sustained_rate_per_source() {
        let mut l = RateLimiter::new(60, 5);
        let t0 = Instant::now();
        let a: IpAddr = "198.18.1.2".parse().unwrap();
        let b: IpAddr = "198.18.2.2".parse().unwrap();
        for i in 0..5 {
            assert!(l.check(a, t0).is_ok(), "request {i} of the burst");
        }
        let wait = l.check(a, t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(l.check(b, t0).is_ok(), "another source has its own bucket");
        assert!(l.check(a, t0 + wait).is_ok(), "one more after the wait");
        assert!(l.check(a, t0 + wait).is_err());
        assert!(
            (0..5).all(|_| l.check(a, t0 + Duration::from_secs(60)).is_ok()),
            "bucket refills"
        );
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let mut l = RateLimiter::new(1, 1);
        let t0 = Instant::now();
        assert!(l.check("fd00:1:2:3::1".parse().unwrap(), t0).is_ok());
        assert!(l.check("fd00:1:2:3::ffff".parse().unwrap(), t0).is_err());
        assert!(l.check("fd00:1:2:4::1".parse().unwrap(), t0).is_ok());
    }
}
