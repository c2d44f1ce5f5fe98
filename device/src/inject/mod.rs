// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fault injection (spec/svmgpu.md section 6.16; grammar in its Appendix B and device/README.md):
//! the rule grammar, the matcher and a seeded deterministic RNG.
//!
//! A spec is a `;`-separated list of items: `seed=S`, or a rule
//! `KIND[:key=value[,key=value...]]`. Each device has one [`Injector`] holding its rules. The
//! device asks it at every decision point of a kind ([`Injector::check`]); a rule *matches*
//! when its filters accept the [`Subject`], and *fires* according to its trigger
//! (`after`, `every`, `p`, `count`). Every rule has its own RNG stream derived from the
//! device's seed, the device index and the rule id, so the same seed and the same sequence
//! of matches give the same injections, whatever other rules see.
//!
//! The fast path (no rule of a kind) is one relaxed atomic load. The injector's lock is a
//! leaf: nothing else is locked while it is held. Rules are bounded ([`MAX_RULES`] per
//! device), and so is the history of recent injections.

pub mod kind;

pub use kind::{Kind, KIND_COUNT};

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use log::info;
use svmgpu_spec::{Status, ASID_ALL, VA_BITS};
use thiserror::Error;

use crate::stats::{Counter, Stats};

/// Most rules one device holds (exhausted rules included, until `clear`).
pub const MAX_RULES: usize = 64;
/// Longest spec accepted, in bytes.
pub const MAX_SPEC_LEN: usize = 4096;
/// Injections remembered for [`Injector::history`].
pub const HISTORY_LEN: usize = 256;
/// Largest `delay_us` (one hour): a longer delay is a drop.
pub const MAX_DELAY_US: u64 = 3_600_000_000;
/// `p` resolution: parts per billion.
const PPB: u64 = 1_000_000_000;

impl Kind {
    /// Keys this kind accepts besides the trigger keys and `device`.
    pub fn keys(self) -> &'static [Key] {
        use Key::*;
        match self {
            Kind::TlbInvalDelay => &[Asid, Va, DelayUs],
            Kind::TlbInvalDrop => &[Asid, Va],
            Kind::TlbInvalError => &[Asid, Va, Status],
            Kind::PreemptDelay => &[Ctx, Asid, DelayUs],
            Kind::PreemptDrop => &[Ctx, Asid],
            Kind::PreemptError => &[Ctx, Asid, Status],
            Kind::EngineHang => &[Ctx, Asid, Engine],
            Kind::FaultSpurious | Kind::FaultDuplicate | Kind::FaultPhantom => {
                &[Ctx, Asid, Engine, Va]
            }
            Kind::CompletionCorrupt => &[Ctx, Rec, Field],
            Kind::CompletionDuplicate => &[Ctx, Rec],
            Kind::CompletionReorder => &[Ctx, Rec, DelayUs],
            Kind::DeviceReset => &[DelayUs],
            Kind::WalkReadError => &[Ctx, Asid, Engine, Va, Level],
            Kind::EventOverflow => &[Ctx, Asid, Engine],
        }
    }

    /// `delay_us` when the rule does not give it.
    pub const fn default_delay_us(self) -> u64 {
        match self {
            Kind::TlbInvalDelay | Kind::PreemptDelay => 1_000,
            Kind::CompletionReorder => 1_000,
            Kind::DeviceReset => 1_000,
            _ => 0,
        }
    }

    /// For `fault-phantom`, `va` is the range the address is drawn from, not a filter.
    const fn va_is_filter(self) -> bool {
        !matches!(self, Kind::FaultPhantom)
    }
}

/// A key of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// `p=F`: probability of firing per match.
    P,
    /// `count=N`: fire at most N times.
    Count,
    /// `every=N`: fire on every Nth match.
    Every,
    /// `after=N`: skip the first N matches.
    After,
    /// `device=N`: only device N.
    Device,
    /// `asid=N` filter.
    Asid,
    /// `ctx=N` filter.
    Ctx,
    /// `engine=N` filter.
    Engine,
    /// `va=LO-HI` filter (half-open) or range (fault-phantom).
    Va,
    /// `rec=command|job|fence` filter (completions).
    Rec,
    /// `delay_us=N`.
    DelayUs,
    /// `status=timeout|internal`.
    Status,
    /// `field=seqno|kind|status` (completion-corrupt).
    Field,
    /// `level=0..3` (walk-read-error).
    Level,
}

impl Key {
    const ALL: &'static [Key] = &[
        Key::P,
        Key::Count,
        Key::Every,
        Key::After,
        Key::Device,
        Key::Asid,
        Key::Ctx,
        Key::Engine,
        Key::Va,
        Key::Rec,
        Key::DelayUs,
        Key::Status,
        Key::Field,
        Key::Level,
    ];

    /// Keys every kind accepts.
    const COMMON: &'static [Key] = &[Key::P, Key::Count, Key::Every, Key::After, Key::Device];

    /// Its name in the grammar.
    pub const fn name(self) -> &'static str {
        match self {
            Key::P => "p",
            Key::Count => "count",
            Key::Every => "every",
            Key::After => "after",
            Key::Device => "device",
            Key::Asid => "asid",
            Key::Ctx => "ctx",
            Key::Engine => "engine",
            Key::Va => "va",
            Key::Rec => "rec",
            Key::DelayUs => "delay_us",
            Key::Status => "status",
            Key::Field => "field",
            Key::Level => "level",
        }
    }

    fn from_name(s: &str) -> Option<Key> {
        Key::ALL.iter().copied().find(|k| k.name() == s)
    }
}

/// Which completion records a `rec=` filter selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecKind {
    /// COMMAND_DONE.
    Command,
    /// JOB_DONE.
    Job,
    /// FENCE.
    Fence,
}

impl RecKind {
    /// Its grammar name.
    pub const fn name(self) -> &'static str {
        match self {
            RecKind::Command => "command",
            RecKind::Job => "job",
            RecKind::Fence => "fence",
        }
    }
}

/// What `completion-corrupt` changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Field {
    /// The seqno becomes a random value with bit 63 set (matches nothing a driver issued).
    #[default]
    Seqno,
    /// The kind becomes an undefined value (`0xbad0 | random 4 bits`).
    Kind,
    /// The status becomes an undefined value (`0xbad00 | random 8 bits`): a failure.
    Status,
}

impl Field {
    /// Its grammar name.
    pub const fn name(self) -> &'static str {
        match self {
            Field::Seqno => "seqno",
            Field::Kind => "kind",
            Field::Status => "status",
        }
    }
}

/// Errors in an injection spec.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InjectError {
    /// The spec is too long.
    #[error("injection spec is longer than {MAX_SPEC_LEN} bytes")]
    TooLong,
    /// Unknown kind.
    #[error("unknown injection kind '{0}' (kinds: {kinds})", kinds = kind_names())]
    UnknownKind(String),
    /// A key the kind does not take.
    #[error("{kind}: unknown key '{key}' (keys: {keys})")]
    UnknownKey {
        /// Kind.
        kind: Kind,
        /// Key given.
        key: String,
        /// Keys accepted.
        keys: String,
    },
    /// A key given twice.
    #[error("{kind}: key '{key}' given twice")]
    DuplicateKey {
        /// Kind.
        kind: Kind,
        /// Key.
        key: &'static str,
    },
    /// An item that is not `key=value`.
    #[error("{kind}: '{item}' is not key=value")]
    NotKeyValue {
        /// Kind.
        kind: Kind,
        /// The item.
        item: String,
    },
    /// A value out of range or malformed.
    #[error("{kind}: bad value '{value}' for '{key}': {why}")]
    BadValue {
        /// Kind (or `seed` for the global key).
        kind: String,
        /// Key.
        key: &'static str,
        /// Value given.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Too many rules on a device.
    #[error("device {device}: at most {MAX_RULES} injection rules (has {has}, adding {adding})")]
    TooManyRules {
        /// Device.
        device: u32,
        /// Rules it has.
        has: usize,
        /// Rules being added.
        adding: usize,
    },
    /// A rule names a device that does not exist.
    #[error("{kind}: device={device}, but there are only {count} device(s)")]
    NoSuchDevice {
        /// Kind.
        kind: Kind,
        /// Device named.
        device: u32,
        /// Devices served.
        count: u32,
    },
}

fn kind_names() -> String {
    Kind::ALL
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// When a matching rule fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Trigger {
    /// Probability per match in parts per billion (`None`: 1).
    pub p_ppb: Option<u64>,
    /// At most this many fires.
    pub count: Option<u64>,
    /// Only every Nth match (counted after `after`).
    pub every: Option<u64>,
    /// The first N matches never fire.
    pub after: u64,
}

/// Which subjects a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Filter {
    /// ASID.
    pub asid: Option<u32>,
    /// Context.
    pub ctx: Option<u32>,
    /// Engine.
    pub engine: Option<u32>,
    /// Virtual-address range `[lo, hi)`.
    pub va: Option<(u64, u64)>,
    /// Completion record kind.
    pub rec: Option<RecKind>,
}

/// Kind-specific parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Params {
    /// `delay_us`.
    pub delay_us: Option<u64>,
    /// `status` (Timeout or Internal).
    pub status: Option<Status>,
    /// `field`.
    pub field: Option<Field>,
    /// `level`.
    pub level: Option<u32>,
}

/// One rule as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// Kind.
    pub kind: Kind,
    /// Trigger.
    pub trigger: Trigger,
    /// Filters.
    pub filter: Filter,
    /// Only this device.
    pub device: Option<u32>,
    /// Parameters.
    pub params: Params,
}

/// A parsed spec: an optional seed and rules.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InjectSpec {
    /// `seed=S`.
    pub seed: Option<u64>,
    /// Rules, in order.
    pub rules: Vec<RuleSpec>,
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    let t: String = s.chars().filter(|&c| c != '_').collect();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().ok()
    } else {
        None
    }
}

/// `p` as parts per billion: a decimal in [0, 1].
fn parse_p(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
        return None;
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut f: u64 = 0;
    for i in 0..9 {
        let d = frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        f = f * 10 + d;
    }
    let ppb = int.checked_mul(PPB)?.checked_add(f)?;
    (ppb <= PPB).then_some(ppb)
}

fn fmt_p(ppb: u64) -> String {
    if ppb >= PPB {
        return "1".into();
    }
    let s = format!("0.{ppb:09}");
    s.trim_end_matches('0').to_string()
}

impl RuleSpec {
    fn parse(item: &str) -> Result<RuleSpec, InjectError> {
        let (name, rest) = match item.split_once(':') {
            Some((n, r)) => (n.trim(), Some(r)),
            None => (item.trim(), None),
        };
        let kind = Kind::from_name(name).ok_or_else(|| InjectError::UnknownKind(name.into()))?;
        let mut r = RuleSpec {
            kind,
            trigger: Trigger::default(),
            filter: Filter::default(),
            device: None,
            params: Params::default(),
        };
        let mut seen: Vec<Key> = Vec::new();
        for kv in rest.into_iter().flat_map(|r| r.split(',')) {
            let kv = kv.trim();
            if kv.is_empty() {
                continue;
            }
            let (k, v) = kv.split_once('=').ok_or_else(|| InjectError::NotKeyValue {
                kind,
                item: kv.into(),
            })?;
            let (k, v) = (k.trim(), v.trim());
            let key = Key::from_name(k)
                .filter(|key| Key::COMMON.contains(key) || kind.keys().contains(key))
                .ok_or_else(|| InjectError::UnknownKey {
                    kind,
                    key: k.into(),
                    keys: Key::COMMON
                        .iter()
                        .chain(kind.keys())
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            if seen.contains(&key) {
                return Err(InjectError::DuplicateKey {
                    kind,
                    key: key.name(),
                });
            }
            seen.push(key);
            r.set(key, v)?;
        }
        Ok(r)
    }

    fn set(&mut self, key: Key, v: &str) -> Result<(), InjectError> {
        let bad = |why: &'static str| InjectError::BadValue {
            kind: self.kind.name().into(),
            key: key.name(),
            value: v.into(),
            why,
        };
        let num = || parse_u64(v).ok_or_else(|| bad("not a number (decimal or 0x hex)"));
        let num32 = || num().and_then(|n| u32::try_from(n).map_err(|_| bad("more than 32 bits")));
        match key {
            Key::P => {
                self.trigger.p_ppb = Some(parse_p(v).ok_or_else(|| bad("not a decimal in [0, 1]"))?)
            }
            Key::Count => self.trigger.count = Some(num()?),
            Key::Every => {
                let n = num()?;
                if n == 0 {
                    return Err(bad("must be at least 1"));
                }
                self.trigger.every = Some(n);
            }
            Key::After => self.trigger.after = num()?,
            Key::Device => self.device = Some(num32()?),
            Key::Asid => self.filter.asid = Some(num32()?),
            Key::Ctx => self.filter.ctx = Some(num32()?),
            Key::Engine => self.filter.engine = Some(num32()?),
            Key::Va => {
                let (lo, hi) = match v.split_once('-') {
                    Some((lo, hi)) => (
                        parse_u64(lo).ok_or_else(|| bad("LO-HI with numbers"))?,
                        parse_u64(hi).ok_or_else(|| bad("LO-HI with numbers"))?,
                    ),
                    None => {
                        let a = num()?;
                        (a, a.saturating_add(1))
                    }
                };
                if lo >= hi {
                    return Err(bad("empty range (LO-HI is half-open, LO < HI)"));
                }
                self.filter.va = Some((lo, hi));
            }
            Key::Rec => {
                self.filter.rec = Some(match v {
                    "command" => RecKind::Command,
                    "job" => RecKind::Job,
                    "fence" => RecKind::Fence,
                    _ => return Err(bad("command, job or fence")),
                })
            }
            Key::DelayUs => {
                let n = num()?;
                if n > MAX_DELAY_US {
                    return Err(bad("at most 3600000000 (one hour)"));
                }
                self.params.delay_us = Some(n);
            }
            Key::Status => {
                self.params.status = Some(match v {
                    "timeout" => Status::Timeout,
                    "internal" => Status::Internal,
                    _ => return Err(bad("timeout or internal")),
                })
            }
            Key::Field => {
                self.params.field = Some(match v {
                    "seqno" => Field::Seqno,
                    "kind" => Field::Kind,
                    "status" => Field::Status,
                    _ => return Err(bad("seqno, kind or status")),
                })
            }
            Key::Level => {
                let n = num()?;
                if n > 3 {
                    return Err(bad("0..3"));
                }
                self.params.level = Some(n as u32);
            }
        }
        Ok(())
    }

    fn matches(&self, s: &Subject) -> bool {
        let f = &self.filter;
        if let Some(a) = f.asid {
            if !s.asid.is_some_and(|x| x == a || x == ASID_ALL) {
                return false;
            }
        }
        if f.ctx.is_some() && s.ctx != f.ctx {
            return false;
        }
        if f.engine.is_some() && s.engine != f.engine {
            return false;
        }
        if f.rec.is_some() && s.rec != f.rec {
            return false;
        }
        if let (Some((lo, hi)), true) = (f.va, self.kind.va_is_filter()) {
            if !s.va.is_some_and(|(a, b)| a < hi && lo < b) {
                return false;
            }
        }
        true
    }
}

impl fmt::Display for RuleSpec {
    /// The canonical form: the kind, then every key given, in grammar order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kv: Vec<String> = Vec::new();
        let t = &self.trigger;
        if let Some(p) = t.p_ppb {
            kv.push(format!("p={}", fmt_p(p)));
        }
        if let Some(n) = t.count {
            kv.push(format!("count={n}"));
        }
        if let Some(n) = t.every {
            kv.push(format!("every={n}"));
        }
        if t.after != 0 {
            kv.push(format!("after={}", t.after));
        }
        if let Some(n) = self.device {
            kv.push(format!("device={n}"));
        }
        let fl = &self.filter;
        if let Some(n) = fl.asid {
            kv.push(format!("asid={n}"));
        }
        if let Some(n) = fl.ctx {
            kv.push(format!("ctx={n}"));
        }
        if let Some(n) = fl.engine {
            kv.push(format!("engine={n}"));
        }
        if let Some((lo, hi)) = fl.va {
            kv.push(format!("va={lo:#x}-{hi:#x}"));
        }
        if let Some(r) = fl.rec {
            kv.push(format!("rec={}", r.name()));
        }
        let p = &self.params;
        if let Some(n) = p.delay_us {
            kv.push(format!("delay_us={n}"));
        }
        if let Some(s) = p.status {
            kv.push(format!(
                "status={}",
                if s == Status::Internal {
                    "internal"
                } else {
                    "timeout"
                }
            ));
        }
        if let Some(x) = p.field {
            kv.push(format!("field={}", x.name()));
        }
        if let Some(n) = p.level {
            kv.push(format!("level={n}"));
        }
        if kv.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}:{}", self.kind, kv.join(","))
        }
    }
}

impl InjectSpec {
    /// Parses `item[;item...]`; items are `seed=S` or rules. Empty items are ignored.
    pub fn parse(s: &str) -> Result<InjectSpec, InjectError> {
        if s.len() > MAX_SPEC_LEN {
            return Err(InjectError::TooLong);
        }
        let mut spec = InjectSpec::default();
        for item in s.split(';') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            if let Some(v) = item.strip_prefix("seed=") {
                let seed = parse_u64(v).ok_or_else(|| InjectError::BadValue {
                    kind: "seed".into(),
                    key: "seed",
                    value: v.into(),
                    why: "not a 64-bit number (decimal or 0x hex)",
                })?;
                spec.seed = Some(seed);
                continue;
            }
            spec.rules.push(RuleSpec::parse(item)?);
            if spec.rules.len() > MAX_RULES {
                return Err(InjectError::TooManyRules {
                    device: 0,
                    has: 0,
                    adding: spec.rules.len(),
                });
            }
        }
        Ok(spec)
    }

    /// Parses and concatenates several specs (repeated `--inject`); the last seed wins.
    pub fn parse_all<S: AsRef<str>>(specs: &[S]) -> Result<InjectSpec, InjectError> {
        let mut all = InjectSpec::default();
        for s in specs {
            let one = InjectSpec::parse(s.as_ref())?;
            all.seed = one.seed.or(all.seed);
            all.rules.extend(one.rules);
            if all.rules.len() > MAX_RULES {
                return Err(InjectError::TooManyRules {
                    device: 0,
                    has: 0,
                    adding: all.rules.len(),
                });
            }
        }
        Ok(all)
    }

    /// Checks that every `device=` names one of `count` devices.
    pub fn check_devices(&self, count: u32) -> Result<(), InjectError> {
        for r in &self.rules {
            if let Some(d) = r.device.filter(|&d| d >= count) {
                return Err(InjectError::NoSuchDevice {
                    kind: r.kind,
                    device: d,
                    count,
                });
            }
        }
        Ok(())
    }

    /// True if there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.seed.is_none() && self.rules.is_empty()
    }
}

impl fmt::Display for InjectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self.seed.map(|s| format!("seed={s}")).into_iter().collect();
        items.extend(self.rules.iter().map(ToString::to_string));
        f.write_str(&items.join(";"))
    }
}

/// SplitMix64: small, fast, and good enough to decide injections reproducibly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator with this state.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

/// SplitMix64's finaliser.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The RNG stream of rule `rule` of device `device` under `seed`.
fn rule_rng(seed: u64, device: u32, rule: u64) -> SplitMix64 {
    SplitMix64::new(mix(seed ^ mix((u64::from(device) << 40) ^ rule)))
}

/// What a decision point is about; a rule's filters are checked against it. `None` fields
/// do not apply (a filter on them does not match), except that `asid` = `ASID_ALL` means
/// "every ASID" (an invalidation of every ASID matches any `asid=` filter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    /// ASID.
    pub asid: Option<u32>,
    /// Context.
    pub ctx: Option<u32>,
    /// Engine.
    pub engine: Option<u32>,
    /// Virtual-address range `[lo, hi)`.
    pub va: Option<(u64, u64)>,
    /// Completion record kind.
    pub rec: Option<RecKind>,
    /// Seqno of the command or job (log only).
    pub seqno: Option<u64>,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(r) = self.rec {
            parts.push(format!("rec {}", r.name()));
        }
        if let Some(s) = self.seqno {
            parts.push(format!("seqno {s}"));
        }
        if let Some(a) = self.asid {
            parts.push(if a == ASID_ALL {
                "asid all".into()
            } else {
                format!("asid {a}")
            });
        }
        if let Some(c) = self.ctx {
            parts.push(format!("ctx {c}"));
        }
        if let Some(e) = self.engine {
            parts.push(format!("engine {e}"));
        }
        if let Some((lo, hi)) = self.va {
            parts.push(format!("va {lo:#x}-{hi:#x}"));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// A fired injection: what the device must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Injection sequence number on this device (1, 2, ...).
    pub seq: u64,
    /// Rule id.
    pub rule: u64,
    /// `delay_us` (or the kind's default).
    pub delay: Duration,
    /// `status` (default `TIMEOUT`).
    pub status: Status,
    /// `field` (default seqno).
    pub field: Field,
    /// `level` (default 3, the root).
    pub level: u32,
    /// `va` range (fault-phantom: where its address is drawn; default `[0, 2^48)`).
    pub va: (u64, u64),
    /// A random value from the rule's stream, drawn after it fired.
    pub random: u64,
}

impl Hit {
    /// fault-phantom: an 8-byte-aligned address in the rule's `va` range.
    pub fn phantom_va(&self) -> u64 {
        let (lo, hi) = self.va;
        let x = lo + self.random % (hi - lo).max(1);
        (x & !7).max(lo)
    }
}

/// One injection, as remembered in the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Rule id.
    pub rule: u64,
    /// Kind.
    pub kind: Kind,
    /// What it applied to.
    pub subject: Subject,
}

/// A rule's state, for `list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// Rule id (per device, from 1).
    pub id: u64,
    /// The rule.
    pub spec: RuleSpec,
    /// Subjects it matched.
    pub matches: u64,
    /// Times it fired.
    pub fired: u64,
    /// `count` reached: it never fires again.
    pub exhausted: bool,
}

#[derive(Debug)]
struct Rule {
    id: u64,
    spec: RuleSpec,
    rng: SplitMix64,
    matches: u64,
    fired: u64,
}

impl Rule {
    fn exhausted(&self) -> bool {
        self.spec.trigger.count.is_some_and(|c| self.fired >= c)
    }

    /// Counts a match and decides whether it fires.
    fn evaluate(&mut self) -> bool {
        let t = self.spec.trigger;
        if self.exhausted() {
            return false;
        }
        self.matches += 1;
        if self.matches <= t.after {
            return false;
        }
        let n = self.matches - t.after;
        if t.every.is_some_and(|e| n % e != 0) {
            return false;
        }
        if let Some(p) = t.p_ppb {
            if self.rng.next_u64() % PPB >= p {
                return false;
            }
        }
        self.fired += 1;
        true
    }
}

#[derive(Debug)]
struct Inner {
    seed: u64,
    rules: Vec<Rule>,
    next_rule: u64,
    seq: u64,
    history: VecDeque<Record>,
}

/// The injections of an [`Injector`] per kind, serialised as a map in kind order.
#[derive(Debug, Clone, Copy)]
pub struct InjectedByKind<'a>(&'a Injector);

impl serde::Serialize for InjectedByKind<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(Kind::ALL.len()))?;
        for &k in Kind::ALL {
            m.serialize_entry(k.name(), &self.0.injected(k))?;
        }
        m.end()
    }
}

/// The injection rules of one device and their state.
#[derive(Debug)]
pub struct Injector {
    device: u32,
    /// Kinds with a live (not exhausted) rule.
    active: AtomicU32,
    /// Injections per kind (their sum is the `injected_faults` counter).
    injected: [AtomicU64; KIND_COUNT],
    /// Configured at start: the device offers `SVMGPU_F_FAULT_INJECT`.
    advertised: AtomicBool,
    inner: Mutex<Inner>,
}

impl Injector {
    /// No rules, seed 0.
    pub fn new(device: u32) -> Self {
        Self {
            device,
            active: AtomicU32::new(0),
            injected: Default::default(),
            advertised: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                seed: 0,
                rules: Vec::new(),
                next_rule: 1,
                seq: 0,
                history: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device index.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The seed rules added from now on derive their streams from.
    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    /// Sets the seed (for rules added from now on).
    pub fn set_seed(&self, seed: u64) {
        self.lock().seed = seed;
    }

    /// Marks injection as configured at start (the device then offers
    /// `SVMGPU_F_FAULT_INJECT`).
    pub fn set_advertised(&self, on: bool) {
        self.advertised.store(on, Ordering::Relaxed);
    }

    /// True if the device offers `SVMGPU_F_FAULT_INJECT`.
    pub fn advertised(&self) -> bool {
        self.advertised.load(Ordering::Relaxed)
    }

    /// Rules of `spec` that apply to this device (no `device=`, or this one).
    pub fn applicable(&self, spec: &InjectSpec) -> usize {
        spec.rules
            .iter()
            .filter(|r| r.device.is_none_or(|d| d == self.device))
            .count()
    }

    /// Room for `n` more rules?
    pub fn check_room(&self, n: usize) -> Result<(), InjectError> {
        let has = self.lock().rules.len();
        if has + n > MAX_RULES {
            return Err(InjectError::TooManyRules {
                device: self.device,
                has,
                adding: n,
            });
        }
        Ok(())
    }

    /// Applies `spec`: its seed (if any), then its rules that apply to this device. Returns
    /// the new rules' ids. Nothing is added if they do not all fit.
    pub fn add(&self, spec: &InjectSpec) -> Result<Vec<u64>, InjectError> {
        let mut i = self.lock();
        let n = self.applicable(spec);
        if i.rules.len() + n > MAX_RULES {
            return Err(InjectError::TooManyRules {
                device: self.device,
                has: i.rules.len(),
                adding: n,
            });
        }
        if let Some(s) = spec.seed {
            i.seed = s;
        }
        let mut ids = Vec::new();
        for r in spec
            .rules
            .iter()
            .filter(|r| r.device.is_none_or(|d| d == self.device))
        {
            let id = i.next_rule;
            i.next_rule += 1;
            info!(
                "svmgpu{}: injection rule {id}: {r} (seed {})",
                self.device, i.seed
            );
            let rng = rule_rng(i.seed, self.device, id);
            i.rules.push(Rule {
                id,
                spec: *r,
                rng,
                matches: 0,
                fired: 0,
            });
            ids.push(id);
        }
        self.update_active(&i);
        Ok(ids)
    }

    /// Removes every rule; returns how many there were. Effects already injected stay
    /// (a dropped invalidation stays dropped, a hung engine stays hung).
    pub fn clear(&self) -> usize {
        let mut i = self.lock();
        let n = i.rules.len();
        i.rules.clear();
        self.update_active(&i);
        if n > 0 {
            info!("svmgpu{}: injection rules cleared ({n})", self.device);
        }
        n
    }

    /// The rules and their state.
    pub fn rules(&self) -> Vec<RuleInfo> {
        self.lock()
            .rules
            .iter()
            .map(|r| RuleInfo {
                id: r.id,
                spec: r.spec,
                matches: r.matches,
                fired: r.fired,
                exhausted: r.exhausted(),
            })
            .collect()
    }

    /// The most recent injections (at most [`HISTORY_LEN`]), oldest first.
    pub fn history(&self) -> Vec<Record> {
        self.lock().history.iter().copied().collect()
    }

    /// Injections of `kind` so far.
    pub fn injected(&self, kind: Kind) -> u64 {
        self.injected[kind as usize].load(Ordering::Relaxed)
    }

    /// Injections per kind, as a JSON-able map `{"tlb-inval-delay":N,...}`.
    pub fn injected_by_kind(&self) -> InjectedByKind<'_> {
        InjectedByKind(self)
    }

    /// Injections so far (every kind).
    pub fn injections(&self) -> u64 {
        self.lock().seq
    }

    fn update_active(&self, i: &Inner) {
        let mask = i
            .rules
            .iter()
            .filter(|r| !r.exhausted())
            .fold(0, |m, r| m | r.spec.kind.bit());
        self.active.store(mask, Ordering::Release);
    }

    /// True if a live rule of `kind` exists (one atomic load).
    #[inline]
    pub fn active(&self, kind: Kind) -> bool {
        self.active.load(Ordering::Relaxed) & kind.bit() != 0
    }

    /// Asks the rules of `kind`, in the order they were added, about `subject`: every rule
    /// whose filters match counts the match, until one fires. A fired injection is counted
    /// (`injected_faults` and the kind's own counter), logged at `info` with its sequence
    /// number, and remembered in the history.
    pub fn check(&self, kind: Kind, subject: &Subject, stats: &Stats) -> Option<Hit> {
        if !self.active(kind) {
            return None;
        }
        let mut i = self.lock();
        let i = &mut *i;
        let mut hit = None;
        for r in i.rules.iter_mut() {
            if r.spec.kind != kind || !r.spec.matches(subject) || !r.evaluate() {
                continue;
            }
            let p = r.spec.params;
            hit = Some(Hit {
                seq: 0,
                rule: r.id,
                delay: Duration::from_micros(p.delay_us.unwrap_or(kind.default_delay_us())),
                status: p.status.unwrap_or(Status::Timeout),
                field: p.field.unwrap_or_default(),
                level: p.level.unwrap_or(3),
                va: r.spec.filter.va.unwrap_or((0, 1 << VA_BITS)),
                random: r.rng.next_u64(),
            });
            if r.exhausted() {
                self.update_active(i);
            }
            break;
        }
        let mut hit = hit?;
        i.seq += 1;
        hit.seq = i.seq;
        if i.history.len() >= HISTORY_LEN {
            i.history.pop_front();
        }
        i.history.push_back(Record {
            seq: hit.seq,
            rule: hit.rule,
            kind,
            subject: *subject,
        });
        stats.inc(Counter::InjectedFaults);
        self.injected[kind as usize].fetch_add(1, Ordering::Relaxed);
        info!(
            "svmgpu{}: inject #{} {kind} (rule {}): {subject}",
            self.device, hit.seq, hit.rule
        );
        Some(hit)
    }
}

/// A seed for runs that do not choose one: time and process id, mixed.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix(t ^ (u64::from(std::process::id()) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> InjectSpec {
        InjectSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        InjectSpec::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn grammar_accepted() {
        let s = p("seed=42; tlb-inval-drop:count=1,asid=3 ;preempt-delay:delay_us=500,p=0.25");
        assert_eq!(s.seed, Some(42));
        assert_eq!(s.rules.len(), 2);
        assert_eq!(s.rules[0].kind, Kind::TlbInvalDrop);
        assert_eq!(s.rules[0].trigger.count, Some(1));
        assert_eq!(s.rules[0].filter.asid, Some(3));
        assert_eq!(s.rules[1].params.delay_us, Some(500));
        assert_eq!(s.rules[1].trigger.p_ppb, Some(250_000_000));
        // Every kind parses bare.
        for k in Kind::ALL {
            let r = p(k.name());
            assert_eq!(r.rules[0].kind, *k);
            assert_eq!(r.rules[0].to_string(), k.name());
        }
        let s =
            p("walk-read-error:va=0x1000-0x3000,level=0,ctx=2,engine=1,every=3,after=2,device=1");
        let r = s.rules[0];
        assert_eq!(r.filter.va, Some((0x1000, 0x3000)));
        assert_eq!(r.params.level, Some(0));
        assert_eq!(
            (r.filter.ctx, r.filter.engine, r.device),
            (Some(2), Some(1), Some(1))
        );
        assert_eq!((r.trigger.every, r.trigger.after), (Some(3), 2));
        let s =
            p("completion-corrupt:field=kind,rec=job;tlb-inval-error:status=internal;seed=0x10");
        assert_eq!(s.seed, Some(16));
        assert_eq!(s.rules[0].params.field, Some(Field::Kind));
        assert_eq!(s.rules[0].filter.rec, Some(RecKind::Job));
        assert_eq!(s.rules[1].params.status, Some(Status::Internal));
        assert_eq!(
            p("fault-spurious:va=0x2000").rules[0].filter.va,
            Some((0x2000, 0x2001))
        );
        assert_eq!(p("").rules.len(), 0);
        assert!(p(" ; ;").is_empty());
        assert_eq!(
            p("engine-hang:count=1_000").rules[0].trigger.count,
            Some(1000)
        );
        for (text, ppb) in [
            ("0", 0),
            ("1", PPB),
            ("1.0", PPB),
            (".5", PPB / 2),
            ("0.000000001", 1),
        ] {
            assert_eq!(parse_p(text), Some(ppb), "{text}");
        }
    }

    #[test]
    fn grammar_rejected() {
        assert!(err("tlb-inval-nope").contains("unknown injection kind 'tlb-inval-nope'"));
        assert!(err("tlb-inval-nope").contains("tlb-inval-delay, tlb-inval-drop"));
        let e = err("device-reset:asid=1");
        assert!(e.contains("device-reset: unknown key 'asid'"), "{e}");
        assert!(
            e.contains("keys: p, count, every, after, device, delay_us"),
            "{e}"
        );
        assert!(err("tlb-inval-drop:count").contains("'count' is not key=value"));
        assert!(err("tlb-inval-drop:count=x").contains("bad value 'x' for 'count'"));
        assert!(err("tlb-inval-drop:count=1,count=2").contains("'count' given twice"));
        for bad in ["2", "1.5", "-0.1", "0.5.1", "abc", "", ".", "0.0000000001"] {
            assert!(
                err(&format!("engine-hang:p={bad}")).contains("not a decimal in [0, 1]"),
                "{bad}"
            );
        }
        assert!(err("engine-hang:every=0").contains("at least 1"));
        assert!(err("fault-spurious:va=0x3000-0x1000").contains("empty range"));
        assert!(err("fault-spurious:va=1-x").contains("LO-HI"));
        assert!(err("tlb-inval-error:status=ok").contains("timeout or internal"));
        assert!(err("completion-corrupt:field=value").contains("seqno, kind or status"));
        assert!(err("completion-duplicate:rec=event").contains("command, job or fence"));
        assert!(err("walk-read-error:level=4").contains("0..3"));
        assert!(err("engine-hang:ctx=0x1_0000_0000").contains("more than 32 bits"));
        assert!(err("device-reset:delay_us=99999999999").contains("one hour"));
        assert!(err("seed=zz").contains("seed"));
        assert!(err("tlb-inval-drop:count=99999999999999999999").contains("not a number"));
        assert_eq!(
            InjectSpec::parse(&"x".repeat(5000)),
            Err(InjectError::TooLong)
        );
        let many = vec!["engine-hang"; MAX_RULES + 1].join(";");
        assert!(matches!(
            InjectSpec::parse(&many),
            Err(InjectError::TooManyRules { .. })
        ));
        let s = p("engine-hang:device=2");
        assert!(s.check_devices(3).is_ok());
        assert_eq!(
            s.check_devices(2).unwrap_err().to_string(),
            "engine-hang: device=2, but there are only 2 device(s)"
        );
    }

    #[test]
    fn canonical_form_round_trips() {
        let text = "seed=7;tlb-inval-delay:p=0.125,count=3,every=2,after=1,device=0,asid=4,\
                    va=0x1000-0x2000,delay_us=9;completion-corrupt:ctx=5,rec=fence,field=status;\
                    tlb-inval-error:status=internal;walk-read-error:engine=1,level=2";
        let s = p(text);
        assert_eq!(s.to_string(), text.replace(' ', ""));
        assert_eq!(p(&s.to_string()), s);
        assert_eq!(
            InjectSpec::parse_all(&["seed=1;engine-hang", "seed=2;device-reset"])
                .unwrap()
                .to_string(),
            "seed=2;engine-hang;device-reset"
        );
    }

    fn inj(spec: &str) -> (Injector, Stats) {
        let i = Injector::new(0);
        i.add(&p(spec)).unwrap();
        (i, Stats::new())
    }

    fn fires(i: &Injector, s: &Stats, kind: Kind, subj: &Subject, n: usize) -> Vec<bool> {
        (0..n).map(|_| i.check(kind, subj, s).is_some()).collect()
    }

    const ANY: Subject = Subject {
        asid: None,
        ctx: None,
        engine: None,
        va: None,
        rec: None,
        seqno: None,
    };

    #[test]
    fn count_every_after_semantics() {
        let (i, s) = inj("engine-hang:count=2");
        assert_eq!(
            fires(&i, &s, Kind::EngineHang, &ANY, 4),
            [true, true, false, false]
        );
        assert!(!i.active(Kind::EngineHang), "exhausted rules are inactive");
        assert!(i.rules()[0].exhausted);
        let (i, s) = inj("engine-hang:every=3");
        assert_eq!(
            fires(&i, &s, Kind::EngineHang, &ANY, 7),
            [false, false, true, false, false, true, false]
        );
        let (i, s) = inj("engine-hang:after=2,every=2,count=2");
        assert_eq!(
            fires(&i, &s, Kind::EngineHang, &ANY, 9),
            [false, false, false, true, false, true, false, false, false]
        );
        let (i, s) = inj("engine-hang");
        assert_eq!(fires(&i, &s, Kind::EngineHang, &ANY, 3), [true; 3]);
        assert_eq!(s.get(Counter::InjectedFaults), 3);
        assert_eq!(i.injected(Kind::EngineHang), 3);
        let (i, s) = inj("engine-hang:p=0");
        assert_eq!(fires(&i, &s, Kind::EngineHang, &ANY, 50), [false; 50]);
        assert_eq!(i.rules()[0].matches, 50);
        // Other kinds are untouched and cost nothing.
        assert!(i.check(Kind::DeviceReset, &ANY, &s).is_none());
        assert!(!i.active(Kind::DeviceReset));
        assert_eq!(s.get(Counter::InjectedFaults), 0);
    }

    #[test]
    fn probability_is_roughly_p() {
        let (i, s) = inj("seed=1;fault-spurious:p=0.25");
        let n = fires(&i, &s, Kind::FaultSpurious, &ANY, 10_000)
            .iter()
            .filter(|&&f| f)
            .count();
        assert!((2_200..2_800).contains(&n), "{n}");
        assert_eq!(i.injected(Kind::FaultSpurious), n as u64);
        assert_eq!(i.history().len(), HISTORY_LEN);
        assert_eq!(i.history().last().unwrap().seq, n as u64);
    }

    #[test]
    fn same_seed_same_sequence() {
        let run = |seed: u64, device: u32| {
            let i = Injector::new(device);
            let s = Stats::new();
            i.add(&p(&format!(
                "seed={seed};tlb-inval-error:p=0.5;fault-phantom:p=0.3"
            )))
            .unwrap();
            let mut out = Vec::new();
            for n in 0..200 {
                let k = if n % 3 == 0 {
                    Kind::FaultPhantom
                } else {
                    Kind::TlbInvalError
                };
                out.push(i.check(k, &ANY, &s).map(|h| (h.seq, h.rule, h.random)));
            }
            out
        };
        assert_eq!(run(5, 0), run(5, 0));
        assert_ne!(run(5, 0), run(6, 0));
        assert_ne!(run(5, 0), run(5, 1), "devices have their own streams");
        // A rule's stream does not depend on other rules' traffic.
        let alone = {
            let i = Injector::new(0);
            let s = Stats::new();
            i.add(&p("seed=5")).unwrap();
            i.add(&p("tlb-inval-error:p=0.5")).unwrap();
            (0..100)
                .map(|_| i.check(Kind::TlbInvalError, &ANY, &s).is_some())
                .collect::<Vec<_>>()
        };
        let mixed = {
            let i = Injector::new(0);
            let s = Stats::new();
            i.add(&p("seed=5;tlb-inval-error:p=0.5;fault-phantom:p=0.5"))
                .unwrap();
            (0..100)
                .map(|_| {
                    i.check(Kind::FaultPhantom, &ANY, &s);
                    i.check(Kind::TlbInvalError, &ANY, &s).is_some()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(alone, mixed);
    }

    #[test]
    fn filters() {
        let (i, s) = inj("tlb-inval-drop:asid=3,va=0x10000-0x20000");
        let inval = |asid, lo, hi| Subject {
            asid: Some(asid),
            va: Some((lo, hi)),
            ..ANY
        };
        let k = Kind::TlbInvalDrop;
        assert!(i.check(k, &inval(2, 0x10000, 0x11000), &s).is_none());
        assert!(
            i.check(k, &inval(3, 0x20000, 0x21000), &s).is_none(),
            "half-open"
        );
        assert!(i.check(k, &inval(3, 0x0, 0x10000), &s).is_none());
        assert!(
            i.check(k, &inval(3, 0xf000, 0x11000), &s).is_some(),
            "overlap"
        );
        assert!(
            i.check(k, &inval(ASID_ALL, 0, 1 << 48), &s).is_some(),
            "every ASID"
        );
        assert!(i.check(k, &ANY, &s).is_none(), "no ASID: no match");
        assert_eq!(i.rules()[0].matches, 2);

        let (i, s) = inj("completion-duplicate:ctx=4,rec=job");
        let rec = |ctx, rec| Subject {
            ctx,
            rec: Some(rec),
            ..ANY
        };
        let k = Kind::CompletionDuplicate;
        assert!(i.check(k, &rec(None, RecKind::Job), &s).is_none());
        assert!(i.check(k, &rec(Some(4), RecKind::Fence), &s).is_none());
        assert!(i.check(k, &rec(Some(5), RecKind::Job), &s).is_none());
        assert!(i.check(k, &rec(Some(4), RecKind::Job), &s).is_some());

        let (i, s) = inj("engine-hang:engine=1;engine-hang:engine=0,count=1");
        let eng = |e| Subject {
            engine: Some(e),
            ..ANY
        };
        let h = i.check(Kind::EngineHang, &eng(0), &s).unwrap();
        assert_eq!(h.rule, 2);
        assert!(i.check(Kind::EngineHang, &eng(0), &s).is_none());
        assert_eq!(i.check(Kind::EngineHang, &eng(1), &s).unwrap().rule, 1);

        // fault-phantom: va is where the address comes from, not a filter.
        let (i, s) = inj("fault-phantom:va=0x5000-0x6000");
        for _ in 0..100 {
            let h = i.check(Kind::FaultPhantom, &ANY, &s).unwrap();
            let va = h.phantom_va();
            assert!((0x5000..0x6000).contains(&va) && va % 8 == 0, "{va:#x}");
        }
    }

    #[test]
    fn hits_carry_defaults_and_params() {
        let (i, s) = inj("tlb-inval-delay;device-reset:delay_us=7;walk-read-error:level=1");
        let h = i.check(Kind::TlbInvalDelay, &ANY, &s).unwrap();
        assert_eq!(
            (h.delay, h.status, h.level),
            (Duration::from_micros(1000), Status::Timeout, 3)
        );
        assert_eq!(h.seq, 1);
        let h = i.check(Kind::DeviceReset, &ANY, &s).unwrap();
        assert_eq!((h.delay, h.seq), (Duration::from_micros(7), 2));
        assert_eq!(i.check(Kind::WalkReadError, &ANY, &s).unwrap().level, 1);
        assert_eq!(i.injections(), 3);
    }

    #[test]
    fn device_selection_bounds_and_clear() {
        let i = Injector::new(1);
        let ids = i
            .add(&p(
                "seed=9;engine-hang:device=0;engine-hang:device=1;device-reset",
            ))
            .unwrap();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(i.seed(), 9);
        assert_eq!(i.rules()[0].spec.to_string(), "engine-hang:device=1");
        let many = InjectSpec {
            seed: None,
            rules: vec![p("engine-hang").rules[0]; MAX_RULES - 1],
        };
        assert!(matches!(
            i.add(&many),
            Err(InjectError::TooManyRules { has: 2, .. })
        ));
        assert_eq!(i.rules().len(), 2, "nothing added");
        assert!(i.check_room(MAX_RULES - 2).is_ok());
        assert_eq!(i.clear(), 2);
        assert!(!i.active(Kind::EngineHang));
        assert_eq!(i.clear(), 0);
        // Ids keep counting.
        assert_eq!(i.add(&p("engine-hang")).unwrap(), vec![3]);
    }
}
