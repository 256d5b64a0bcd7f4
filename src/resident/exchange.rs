//! Routed experts over several devices: each token's hidden state goes to the devices
//! (and, in hybrid mode, the host) that hold the experts it is routed to, each owner
//! computes its experts over all the tokens sent to it at once, and the weighted sums
//! come back to the token's own device.
//!
//! The exchange passes through host memory: every device's normalised hidden states come
//! down (page-locked, asynchronously, while the devices start on their shared experts),
//! each owner's rows go up, and each owner's sums come down again. Every owner's work is
//! queued before any result is awaited, so the devices compute at the same time.

use super::pass::{work, Group, Prepared, Resident};
use super::DeviceOps;
use crate::model::{Ffn, Model, RouteObserver};
use std::collections::{BTreeMap, HashMap};

/// Where a routed expert runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    Device(usize),
    Host,
}

/// The tokens one owner computes: rows `(group, token)` in the order they are sent, and
/// per expert the `(row, weight)` pairs routed to it.
struct Shipment {
    rows: Vec<(usize, usize)>,
    index: HashMap<(usize, usize), usize>,
    per_expert: Vec<Vec<(usize, f32)>>,
}

impl Shipment {
    fn new(experts: usize) -> Self {
        Shipment {
            rows: Vec::new(),
            index: HashMap::new(),
            per_expert: vec![Vec::new(); experts],
        }
    }

    fn add(&mut self, group: usize, token: usize, expert: usize, weight: f32) {
        let next = self.rows.len();
        let row = *self.index.entry((group, token)).or_insert(next);
        if row == next {
            self.rows.push((group, token));
        }
        self.per_expert[expert].push((row, weight));
    }

    /// The shipped rows gathered from the groups' host copies.
    fn gather(&self, hosts: &[Vec<f32>], h: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(self.rows.len() * h);
        for &(g, t) in &self.rows {
            x.extend_from_slice(&hosts[g][t * h..(t + 1) * h]);
        }
        x
    }

    /// Adds an owner's row sums into the groups' host sums.
    fn scatter(&self, y: &[f32], sums: &mut [Vec<f32>], h: usize) {
        for (r, &(g, t)) in self.rows.iter().enumerate() {
            for (a, b) in sums[g][t * h..(t + 1) * h]
                .iter_mut()
                .zip(&y[r * h..(r + 1) * h])
            {
                *a += b;
            }
        }
    }
}

/// One MoE layer over several devices; returns each group's output (shared expert plus
/// its tokens' routed experts, wherever they ran).
pub(super) fn exchange_experts<O: DeviceOps>(
    r: &Resident<O>,
    model: &Model,
    prepared: &[Prepared<O>],
    l: usize,
    groups: &[&Group<O>],
    xns: &[O::Buf],
    on_route: &mut RouteObserver,
) -> Vec<O::Buf> {
    let cfg = &model.config;
    let h = cfg.hidden_size;
    let Ffn::Moe(moe) = &model.layers[l].ffn else {
        unreachable!("exchange_experts() is only called on MoE layers")
    };
    // Routers, then the hidden states start down while the shared experts are queued.
    let routes: Vec<_> = groups
        .iter()
        .zip(xns)
        .map(|(g, xn)| {
            let ops = r.device(g.device);
            let logits = ops.linear(&moe.router, xn, g.tokens);
            ops.route(
                cfg,
                &logits,
                prepared[g.device].correction_bias(l),
                g.tokens,
            )
        })
        .collect();
    let downloads: Vec<_> = groups
        .iter()
        .zip(xns)
        .map(|(g, xn)| r.device(g.device).begin_download(xn))
        .collect();
    let mut outs: Vec<O::Buf> = groups
        .iter()
        .zip(xns)
        .map(|(g, xn)| {
            let ops = r.device(g.device);
            let mut out = ops.zeros(g.tokens * h);
            if let Some(shared) = &moe.shared {
                let all: Vec<(usize, f32)> = (0..g.tokens).map(|t| (t, 1.0)).collect();
                ops.ffn_accumulate(shared, xn, &all, &mut out);
            }
            out
        })
        .collect();

    // Who computes what.
    let mut shipments: BTreeMap<Owner, Shipment> = BTreeMap::new();
    for (gi, routes) in routes.iter().enumerate() {
        for (t, route) in routes.iter().enumerate() {
            on_route(l, route);
            for &(e, w) in route {
                let Some(f) = moe.experts.get(e) else {
                    continue;
                };
                shipments
                    .entry(r.owner(f))
                    .or_insert_with(|| Shipment::new(moe.experts.len()))
                    .add(gi, t, e, w);
            }
        }
    }
    let hosts: Vec<Vec<f32>> = groups
        .iter()
        .zip(downloads)
        .map(|(g, d)| {
            let mut x = vec![0.0f32; g.tokens * h];
            r.device(g.device).finish_download(d, &mut x);
            x
        })
        .collect();

    // Every device owner's experts are queued (devices in order), then the host computes
    // its own (`Owner::Host` sorts last).
    let mut pending = Vec::new();
    let mut sums: Vec<Vec<f32>> = groups.iter().map(|g| vec![0.0f32; g.tokens * h]).collect();
    for (owner, s) in &shipments {
        let x = s.gather(&hosts, h);
        match owner {
            Owner::Device(d) => {
                let ops = r.device(*d);
                let xd = ops.upload(&x);
                let mut y = ops.zeros(s.rows.len() * h);
                ops.experts_accumulate(&work(&moe.experts, &s.per_expert), &xd, &mut y);
                pending.push((s, *d, ops.begin_download(&y)));
            }
            Owner::Host => {
                if let Some(host) = r.host() {
                    let mut y = vec![0.0f32; s.rows.len() * h];
                    host.moe_accumulate(&work(&moe.experts, &s.per_expert), &x, &mut y);
                    s.scatter(&y, &mut sums, h);
                }
            }
        }
    }
    for (s, d, download) in pending {
        let mut y = vec![0.0f32; s.rows.len() * h];
        r.device(d).finish_download(download, &mut y);
        s.scatter(&y, &mut sums, h);
    }
    for ((g, out), sum) in groups.iter().zip(outs.iter_mut()).zip(&sums) {
        let ops = r.device(g.device);
        ops.add(out, &ops.upload(sum));
    }
    outs
}
