//! Connection slots: the one owner of a client connection's lifetime.
//!
//! A [`ConnLease`] is taken at accept (before TLS) and released when the last holder
//! drops it: the HTTP connection task, and, if the connection was upgraded, the
//! WebSocket tunnel that outlives it. It carries the `max_connections` permit, the
//! `max_connections_per_ip` slot and the `connections_active` gauge, so all three
//! always agree and a tunnel can never escape the limits (issue 10, items 1 and 2).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client_ip::{normalize, ClientIpPolicy};
use crate::metrics::ConnectionGuard;

/// An open HTTP connection as the eviction policy sees it.
pub trait Evictable: Send + Sync {
    /// When it became idle (a keep-alive that has served a request and has nothing in
    /// flight), in any monotonic unit; `None` while busy or before its first request.
    fn idle_since(&self) -> Option<u64>;
    /// Asks the connection to close now (gracefully).
    fn evict(&self);
}

/// The limits of one listener.
pub struct ConnLimits {
    global: Arc<Semaphore>,
    per_ip: Option<PerIp>,
    /// Open HTTP connections (not tunnels), so that at the limit the oldest idle
    /// keep-alive can make room for a new client, the way nginx reuses idle keep-alive
    /// connections instead of leaving new users in the kernel backlog.
    open: Arc<Mutex<HashMap<u64, Arc<dyn Evictable>>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ConnLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLimits")
            .field("available", &self.global.available_permits())
            .field("per_ip", &self.per_ip)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct PerIp {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Trusted proxies (load balancers) carry many clients on their connections: a
    /// per-IP cap on them would cap every client behind them together.
    exempt: ClientIpPolicy,
}

/// `ip` already holds `max_connections_per_ip` connections.
struct AtCap;

impl PerIp {
    /// A slot for `ip` (`None` for an exempt trusted proxy), or [`AtCap`].
    fn claim(&self, ip: IpAddr) -> Result<Option<IpSlot>, AtCap> {
        if self.exempt.is_trusted(ip) {
            return Ok(None);
        }
        let ip = normalize(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return Err(AtCap);
        }
        *n += 1;
        Ok(Some(IpSlot {
            ip,
            open: self.open.clone(),
        }))
    }
}

impl ConnLimits {
    /// `max_per_ip = 0` turns the per-IP cap off.
    pub fn new(max_connections: usize, max_per_ip: usize, exempt: ClientIpPolicy) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_connections)),
            per_ip: (max_per_ip > 0).then(|| PerIp {
                max: max_per_ip,
                open: Arc::default(),
                exempt,
            }),
            open: Arc::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Waits for a global slot.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.global.clone().acquire_owned().await.ok()
    }

    /// A global slot if one is free now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.global.clone().try_acquire_owned().ok()
    }

    /// Asks the connection idle the longest to close; false when none is idle (every
    /// slot is busy: the new client waits). O(open connections), only run at the limit.
    pub fn evict_oldest_idle(&self) -> bool {
        let oldest = {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.values()
                .filter_map(|c| c.idle_since().map(|t| (t, c.clone())))
                .min_by_key(|(t, _)| *t)
                .map(|(_, c)| c)
        };
        match oldest {
            Some(c) => {
                c.evict();
                true
            }
            None => false,
        }
    }

    /// Turns a global permit into a lease for a connection from `peer`, or `None` when
    /// that address already holds `max_connections_per_ip` connections (the caller
    /// closes the socket at once; the permit goes back).
    pub fn admit(
        &self,
        permit: OwnedSemaphorePermit,
        peer: IpAddr,
        counted: impl FnOnce() -> Option<ConnectionGuard>,
    ) -> Option<ConnLease> {
        let ip_slot = match &self.per_ip {
            None => None,
            Some(p) => p.claim(peer).ok()?,
        };
        Some(ConnLease {
            _permit: permit,
            ip_slot,
            // Only admitted connections count as accepted and active.
            _counted: counted(),
            limits: self.open.clone(),
            next_id: self.next_id.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The connection's client is `client`, named by a PROXY header from a trusted
    /// proxy (which is exempt, so the lease holds no per-IP slot yet): from now on it
    /// counts against `client`'s `max_connections_per_ip`, as a direct connection from
    /// `client` would. False when `client` already holds its cap: the caller closes the
    /// connection before TLS. A lease already counted for its peer is left as it is.
    pub fn admit_named_client(&self, lease: &mut ConnLease, client: IpAddr) -> bool {
        let Some(p) = &self.per_ip else {
            return true;
        };
        if lease.ip_slot.is_some() {
            return true;
        }
        match p.claim(client) {
            Ok(slot) => {
                lease.ip_slot = slot;
                true
            }
            Err(AtCap) => false,
        }
    }

    /// True when `ip` already holds its `max_connections_per_ip` connections (checked
    /// again, atomically, by [`ConnLimits::admit`]).
    pub fn ip_full(&self, ip: IpAddr) -> bool {
        self.per_ip
            .as_ref()
            .is_some_and(|p| !p.exempt.is_trusted(ip) && self.open_from(ip) >= p.max)
    }

    /// Connections currently open from `ip` (for tests and diagnostics).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_ip.as_ref().map_or(0, |p| {
            let open = p.open.lock().unwrap_or_else(|e| e.into_inner());
            open.get(&normalize(ip)).copied().unwrap_or(0)
        })
    }
}

/// Everything a connection holds while it is open. Dropping it frees the slots.
pub struct ConnLease {
    _permit: OwnedSemaphorePermit,
    ip_slot: Option<IpSlot>,
    _counted: Option<ConnectionGuard>,
    limits: Arc<Mutex<HashMap<u64, Arc<dyn Evictable>>>>,
    next_id: u64,
}

impl std::fmt::Debug for ConnLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLease")
            .field("ip_slot", &self.ip_slot)
            .finish_non_exhaustive()
    }
}

impl ConnLease {
    /// Makes the HTTP connection holding this lease a candidate for eviction (see
    /// [`ConnLimits::evict_oldest_idle`]) until the returned guard drops; an upgraded
    /// tunnel, which keeps the lease but not the guard, is never evicted.
    pub fn register(&self, conn: Arc<dyn Evictable>) -> Registered {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.next_id, conn);
        Registered {
            id: self.next_id,
            open: self.limits.clone(),
        }
    }
}

/// Removes a connection from the eviction candidates when dropped.
pub struct Registered {
    id: u64,
    open: Arc<Mutex<HashMap<u64, Arc<dyn Evictable>>>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[derive(Debug)]
struct IpSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // No entry per address that has gone: the map stays as small as the
                // set of addresses with open connections.
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn per_ip_cap_counts_until_the_lease_drops() {
        let limits = ConnLimits::new(10, 2, ClientIpPolicy::default());
        let a = limits
            .admit(limits.acquire().await.unwrap(), ip("192.0.2.1"), || None)
            .unwrap();
        let _b = limits
            .admit(
                limits.acquire().await.unwrap(),
                ip("::ffff:192.0.2.1"),
                || None,
            )
            .unwrap();
        assert!(limits
            .admit(limits.acquire().await.unwrap(), ip("192.0.2.1"), || None)
            .is_none());
        // Another address is not affected.
        assert!(limits
            .admit(limits.acquire().await.unwrap(), ip("192.0.2.2"), || None)
            .is_some());
        assert_eq!(limits.open_from(ip("192.0.2.1")), 2);
        drop(a);
        assert_eq!(limits.open_from(ip("192.0.2.1")), 1);
        assert!(limits
            .admit(limits.acquire().await.unwrap(), ip("192.0.2.1"), || None)
            .is_some());
    }

    #[tokio::test]
    async fn a_client_named_by_a_trusted_proxy_counts_against_its_own_cap() {
        let trusted = ClientIpPolicy::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let limits = ConnLimits::new(10, 1, trusted);
        let lease = || limits.admit(limits.try_acquire().unwrap(), ip("10.0.0.1"), || None);
        let mut first = lease().unwrap();
        assert!(limits.admit_named_client(&mut first, ip("192.0.2.7")));
        assert_eq!(limits.open_from(ip("192.0.2.7")), 1);
        // The same client through the same (exempt) proxy: over its cap.
        let mut second = lease().unwrap();
        assert!(!limits.admit_named_client(&mut second, ip("192.0.2.7")));
        // Another client through the proxy, and a trusted name, are fine.
        assert!(limits.admit_named_client(&mut second, ip("192.0.2.8")));
        let mut third = lease().unwrap();
        assert!(limits.admit_named_client(&mut third, ip("10.0.0.2")));
        assert_eq!(limits.open_from(ip("10.0.0.2")), 0);
        drop(first);
        assert_eq!(limits.open_from(ip("192.0.2.7")), 0);
    }

    #[tokio::test]
    async fn trusted_proxies_are_exempt_and_zero_is_off() {
        let trusted = ClientIpPolicy::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let limits = ConnLimits::new(10, 1, trusted);
        let _a = limits
            .admit(limits.acquire().await.unwrap(), ip("10.0.0.1"), || None)
            .unwrap();
        assert!(limits
            .admit(limits.acquire().await.unwrap(), ip("10.0.0.1"), || None)
            .is_some());
        let off = ConnLimits::new(10, 0, ClientIpPolicy::default());
        let _x = off
            .admit(off.acquire().await.unwrap(), ip("192.0.2.1"), || None)
            .unwrap();
        assert!(off
            .admit(off.acquire().await.unwrap(), ip("192.0.2.1"), || None)
            .is_some());
    }
}
