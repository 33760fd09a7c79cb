//! What the proxy applies now: the routes' policies and the upstream
//! clients they send to, swapped whole on a reload (an `ArcSwap`), so a
//! request finishes on the snapshot it started with.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::upstream::Upstream;
use crate::config::{Config, Policies, Policy, UpstreamConfig};

/// One configuration's routes and clients.
pub struct Routing {
    pub policies: Policies,
    default: Upstream,
    /// Per route: its own client, or `None` for the default.
    routes: Vec<Option<Upstream>>,
    /// Every client by its config, so a reload keeps the pools of
    /// upstreams that did not change.
    clients: Vec<(UpstreamConfig, Upstream)>,
}

/// The routing every request reads and a reload replaces.
pub type SharedRouting = Arc<ArcSwap<Routing>>;

impl Routing {
    /// Builds the clients `config` names, reusing `previous`'s where the
    /// upstream config is the same. `None` without an upstream.
    pub fn build(config: &Config, previous: Option<&Routing>) -> Result<Option<Self>, String> {
        let Some(default_config) = &config.default_upstream else {
            return Ok(None);
        };
        let mut clients: Vec<(UpstreamConfig, Upstream)> = Vec::new();
        let mut client = |u: &UpstreamConfig| -> Result<Upstream, String> {
            if let Some((_, c)) = clients.iter().find(|(k, _)| k == u) {
                return Ok(c.clone());
            }
            let reused = previous.and_then(|p| p.clients.iter().find(|(k, _)| k == u));
            let c = match reused {
                Some((_, c)) => c.clone(),
                None => Upstream::from_config(u)?,
            };
            clients.push((u.clone(), c.clone()));
            Ok(c)
        };
        let default = client(default_config)?;
        let mut routes = Vec::with_capacity(config.policies.routes.len());
        for r in &config.policies.routes {
            routes.push(match &r.upstream {
                Some(u) => Some(client(u)?),
                None => None,
            });
        }
        Ok(Some(Routing {
            policies: config.policies.clone(),
            default,
            routes,
            clients,
        }))
    }

    /// Every path to one upstream (tests, and embedding with any service).
    pub fn single(policies: Policies, upstream: Upstream) -> Self {
        Routing {
            routes: vec![None; policies.routes.len()],
            policies,
            default: upstream,
            clients: Vec::new(),
        }
    }

    /// The policy and the upstream for a path.
    pub fn for_path(&self, path: &str) -> (&Arc<Policy>, &Upstream) {
        match self.policies.find(path) {
            Some(i) => (
                &self.policies.routes[i].policy,
                self.routes[i].as_ref().unwrap_or(&self.default),
            ),
            None => (&self.policies.default, &self.default),
        }
    }
}
