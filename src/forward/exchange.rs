//! Routed experts over several devices (data-parallel attention): each token's hidden
//! state goes to the devices that hold the experts it is routed to, each owner computes
//! its experts over all the tokens sent to it at once, and the weighted sums come back
//! to the token's own device.
//!
//! Between devices the rows move through the pass's [`Fabric`](super::Fabric): host
//! memory by default, NCCL peer-to-peer where the GPUs have it. Each group gathers what
//! it sends in one kernel and each owner joins what it receives, so every move is one
//! contiguous buffer, and every owner's work is queued before any result is awaited.

use super::layout::Group;
use super::pass::{Computed, Pass, Prepared};
use super::DeviceOps;
use crate::device::DeviceResult;
use crate::model::{expert_work, Ffn, Model, RouteObserver};
use std::collections::{BTreeMap, HashMap};

/// The tokens one device computes: rows `(group, token)` in the order they are sent,
/// and per expert the `(row, weight)` pairs routed to it.
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
}

/// One MoE layer over several devices; returns each group's output (shared expert plus
/// its tokens' routed experts, wherever they ran). A group's router logits and shared
/// expert output already computed (a recorded decode step) are taken from `computed`.
pub(super) fn exchange_experts<O: DeviceOps>(
    r: &Pass<O>,
    model: &Model,
    prepared: &[Prepared<O>],
    l: usize,
    groups: &[&Group<O>],
    (xns, computed): (&[&O::Buf], &[Computed<O::Buf>]),
    on_route: &mut RouteObserver,
) -> DeviceResult<Vec<O::Buf>> {
    let cfg = &model.config;
    let h = cfg.hidden_size;
    let Ffn::Moe(moe) = &model.layers[l].ffn else {
        unreachable!("exchange_experts() is only called on MoE layers")
    };
    // Routers, then the hidden states start down while the shared experts are queued.
    let routes: Vec<_> = groups
        .iter()
        .zip(xns)
        .zip(computed)
        .map(|((g, xn), c)| {
            let ops = r.device(g.device);
            let own;
            let logits = match c.logits {
                Some(logits) => logits,
                None => {
                    own = ops.linear(&moe.router, xn, g.tokens)?;
                    &own
                }
            };
            let bias = prepared[g.device].correction_bias(l);
            ops.route(cfg, logits, bias, g.tokens)
        })
        .collect::<DeviceResult<_>>()?;
    let mut outs: Vec<O::Buf> = groups
        .iter()
        .zip(xns)
        .zip(computed)
        .map(|((g, xn), c)| {
            let ops = r.device(g.device);
            let mut out = ops.zeros(g.tokens * h)?;
            match (&moe.shared, c.ffn) {
                (Some(_), Some(shared_out)) => ops.add(&mut out, shared_out)?,
                (Some(shared), None) => {
                    let all: Vec<(usize, f32)> = (0..g.tokens).map(|t| (t, 1.0)).collect();
                    ops.ffn_accumulate(shared, xn, &all, &mut out)?;
                }
                (None, _) => {}
            }
            Ok(out)
        })
        .collect::<DeviceResult<_>>()?;

    // Who computes what: shipments per owning device, in device order.
    let mut shipments: BTreeMap<usize, Shipment> = BTreeMap::new();
    for (gi, routes) in routes.iter().enumerate() {
        for (t, route) in routes.iter().enumerate() {
            on_route(l, route);
            for &(e, w) in route {
                let Some(f) = moe.experts.get(e) else {
                    continue;
                };
                shipments
                    .entry(r.expert_device(f))
                    .or_insert_with(|| Shipment::new(moe.experts.len()))
                    .add(gi, t, e, w);
            }
        }
    }
    device_owners(r, moe, groups, xns, &shipments, &mut outs, h)?;
    Ok(outs)
}

/// The routed experts on devices, exchanged device to device through the resident pass's
/// fabric: each group gathers the rows it sends (ordered by owner) and cuts them per
/// owner; each owner joins what it receives (ordered by group, as its shipment numbers
/// the rows), computes its experts over them, and cuts the sums per group; each group
/// joins what comes back and adds it to its tokens' rows.
fn device_owners<O: DeviceOps>(
    r: &Pass<O>,
    moe: &crate::model::Moe,
    groups: &[&Group<O>],
    xns: &[&O::Buf],
    shipments: &BTreeMap<usize, Shipment>,
    outs: &mut [O::Buf],
    h: usize,
) -> DeviceResult<()> {
    let owners: Vec<(usize, &Shipment)> = shipments.iter().map(|(&d, s)| (d, s)).collect();
    // tokens[gi][k]: group gi's tokens sent to owners[k], in the owner's row order.
    let tokens: Vec<Vec<Vec<usize>>> = (0..groups.len())
        .map(|gi| {
            owners
                .iter()
                .map(|(_, s)| s.rows.iter().filter(|r| r.0 == gi).map(|r| r.1).collect())
                .collect()
        })
        .collect();
    let mut moves = Vec::new();
    for (gi, (g, xn)) in groups.iter().zip(xns).enumerate() {
        let ops = r.device(g.device);
        let sent: Vec<usize> = tokens[gi].iter().flatten().copied().collect();
        if sent.is_empty() {
            continue;
        }
        let gathered = ops.take_rows(xn, &sent, h)?;
        let lens: Vec<usize> = tokens[gi].iter().map(|t| t.len() * h).collect();
        let nonempty: Vec<usize> = lens.iter().copied().filter(|&n| n > 0).collect();
        let mut pieces = ops.split(&gathered, &nonempty)?.into_iter();
        for (k, &n) in lens.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if let Some(piece) = pieces.next() {
                moves.push((g.device, owners[k].0, piece));
            }
        }
    }
    let mut arrived = r.fabric().transfer(r.devices(), moves)?.into_iter();
    // Owners in order; each receives from the groups in order (as `moves` was built:
    // group-major, so regroup per owner).
    let mut inbox: Vec<Vec<O::Buf>> = owners.iter().map(|_| Vec::new()).collect();
    for group_tokens in &tokens {
        for (k, t) in group_tokens.iter().enumerate() {
            if !t.is_empty() {
                if let Some(b) = arrived.next() {
                    inbox[k].push(b);
                }
            }
        }
    }
    let mut back = Vec::new();
    for (k, ((d, s), parts)) in owners.iter().zip(inbox).enumerate() {
        let ops = r.device(*d);
        let x = ops.concat(&parts)?;
        let mut y = ops.zeros(s.rows.len() * h)?;
        ops.experts_accumulate(&expert_work(&moe.experts, &s.per_expert), &x, &mut y)?;
        let lens: Vec<usize> = (0..groups.len())
            .map(|gi| tokens[gi][k].len() * h)
            .filter(|&n| n > 0)
            .collect();
        let senders: Vec<usize> = (0..groups.len())
            .filter(|&gi| !tokens[gi][k].is_empty())
            .collect();
        for (gi, piece) in senders.into_iter().zip(ops.split(&y, &lens)?) {
            back.push((gi, *d, groups[gi].device, piece));
        }
    }
    let senders: Vec<usize> = back.iter().map(|(gi, _, _, _)| *gi).collect();
    let moves = back
        .into_iter()
        .map(|(_, from, to, b)| (from, to, b))
        .collect();
    let returned = r.fabric().transfer(r.devices(), moves)?;
    // Per group, the pieces in owner order, added to the rows they came from.
    let mut mail: Vec<Vec<O::Buf>> = groups.iter().map(|_| Vec::new()).collect();
    for (gi, b) in senders.into_iter().zip(returned) {
        mail[gi].push(b);
    }
    for (gi, (g, pieces)) in groups.iter().zip(mail).enumerate() {
        if pieces.is_empty() {
            continue;
        }
        let ops = r.device(g.device);
        // Pieces arrive in owner order, one per owner this group sent to.
        let rows: Vec<usize> = tokens[gi].iter().flatten().copied().collect();
        let joined = ops.concat(&pieces)?;
        ops.add_rows(&mut outs[gi], &rows, &joined, h)?;
    }
    Ok(())
}
