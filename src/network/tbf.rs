//! Token bucket filter (`tbf`) qdiscs over rtnetlink: how the built-in
//! network limits a pod's bandwidth. netlink-packet-route has no TBF
//! options, so their attributes are built here, as iproute2's
//! `tc qdisc replace dev D root handle 1: tbf rate R burst B latency 25ms`
//! sends them (`include/uapi/linux/pkt_sched.h`, `net/sched/sch_tbf.c`):
//!
//! - `TCA_TBF_PARMS`: `struct tc_tbf_qopt` = the rate's `struct tc_ratespec`,
//!   the peak rate's (zero: none), then `limit` (bytes the queue holds),
//!   `buffer` (the bucket as transmit time, in 64 ns psched ticks) and `mtu`
//!   (only with a peak rate). All in host byte order.
//! - `TCA_TBF_RATE64`: the rate in bytes/s when it does not fit the 32-bit
//!   field (34 Gbit/s and more); the field then holds `u32::MAX`.
//! - `TCA_TBF_BURST`: the bucket in bytes, which the kernel prefers to
//!   `buffer` (it recomputes the time from it).
//!
//! The rate spec's link layer is Ethernet, as `tc` sets it, so the kernel
//! needs no rate table (`TCA_TBF_RTAB` is only read for link-layer
//! detection). Without a `limit` the kernel would give the qdisc no queue
//! and drop everything, so there always is one: 25 ms of traffic at the rate
//! plus the bucket, the CNI bandwidth plugin's and `tc`'s `latency` formula.

use futures_util::StreamExt as _;
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};

const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// `sizeof(struct tc_ratespec)`: cell_log u8, linklayer u8, overhead u16,
/// cell_align i16, mpu u16, rate u32.
const RATESPEC_LEN: usize = 12;
/// `sizeof(struct tc_tbf_qopt)`.
const QOPT_LEN: usize = 2 * RATESPEC_LEN + 12;
/// The queue holds this much traffic at the rate, on top of the bucket.
const LATENCY_NS: u128 = 25_000_000;
/// `PSCHED_SHIFT` is 6: one psched tick is 64 ns.
const NS_PER_TICK: u128 = 64;

/// One direction's shaping, in the kernel's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    pub rate_bytes: u64,
    pub burst_bytes: u32,
    pub limit_bytes: u32,
}

impl Tbf {
    /// From the CNI `bandwidth` capability's units: a rate in bits per
    /// second and a burst in bits (divided by 8 as the CNI plugin does).
    pub fn from_bits(rate_bits: u64, burst_bits: u64) -> Result<Tbf, String> {
        let rate_bytes = rate_bits / 8;
        if rate_bytes == 0 {
            return Err(format!(
                "a rate of {rate_bits} bit/s is below one byte per second"
            ));
        }
        let burst_bytes = u32::try_from(burst_bits / 8).unwrap_or(u32::MAX);
        if burst_bytes == 0 {
            return Err(format!("a burst of {burst_bits} bits is below one byte"));
        }
        let queued = u128::from(rate_bytes) * LATENCY_NS / 1_000_000_000 + u128::from(burst_bytes);
        Ok(Tbf {
            rate_bytes,
            burst_bytes,
            limit_bytes: u32::try_from(queued).unwrap_or(u32::MAX),
        })
    }

    /// The bucket as the time it takes to send it at the rate, in ticks.
    fn buffer_ticks(&self) -> u32 {
        let ns = u128::from(self.burst_bytes) * 1_000_000_000 / u128::from(self.rate_bytes);
        u32::try_from(ns / NS_PER_TICK).unwrap_or(u32::MAX)
    }

    /// `struct tc_tbf_qopt`.
    fn qopt(&self) -> [u8; QOPT_LEN] {
        let mut q = [0u8; QOPT_LEN];
        // rate: cell_log, overhead, cell_align and mpu stay 0.
        q[1] = TC_LINKLAYER_ETHERNET;
        let rate32 = u32::try_from(self.rate_bytes).unwrap_or(u32::MAX);
        q[8..12].copy_from_slice(&rate32.to_ne_bytes());
        // peakrate: all zero, no peak rate.
        let tail = 2 * RATESPEC_LEN;
        q[tail..tail + 4].copy_from_slice(&self.limit_bytes.to_ne_bytes());
        q[tail + 4..tail + 8].copy_from_slice(&self.buffer_ticks().to_ne_bytes());
        // mtu: 0 without a peak rate.
        q
    }

    /// The `TCA_OPTIONS` of the qdisc.
    fn options(&self) -> Vec<TcOption> {
        let mut options = vec![TcOption::Other(DefaultNla::new(
            TCA_TBF_PARMS,
            self.qopt().to_vec(),
        ))];
        if self.rate_bytes > u64::from(u32::MAX) {
            options.push(TcOption::Other(DefaultNla::new(
                TCA_TBF_RATE64,
                self.rate_bytes.to_ne_bytes().to_vec(),
            )));
        }
        options.push(TcOption::Other(DefaultNla::new(
            TCA_TBF_BURST,
            self.burst_bytes.to_ne_bytes().to_vec(),
        )));
        options
    }

    /// Makes this the root qdisc (handle `1:`) of interface `index`, in
    /// place of whatever root qdisc it has (`tc qdisc replace`), so that a
    /// retried attach gives the same result. rtnetlink's qdisc request
    /// cannot carry options, hence the message is sent as it is built here.
    pub async fn replace_root(&self, handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
        let mut message = TcMessage::with_index(
            i32::try_from(index).map_err(|_| rtnetlink::Error::RequestFailed)?,
        );
        message.header.handle = TcHandle { major: 1, minor: 0 };
        message.header.parent = TcHandle::ROOT;
        message
            .attributes
            .push(TcAttribute::Kind("tbf".to_string()));
        message
            .attributes
            .push(TcAttribute::Options(self.options()));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let mut responses = handle.clone().request(request)?;
        while let Some(response) = responses.next().await {
            if let NetlinkPayload::Error(error) = response.payload
                && error.code.is_some()
            {
                return Err(rtnetlink::Error::NetlinkError(error));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::Nla;

    fn emitted(option: &TcOption) -> (u16, Vec<u8>) {
        let mut value = vec![0u8; option.value_len()];
        option.emit_value(&mut value);
        (option.kind(), value)
    }

    #[test]
    fn units_follow_the_cni_plugin() {
        // 10 Mbit/s with containerd's burst of u32::MAX bits.
        let tbf = Tbf::from_bits(10_000_000, u64::from(u32::MAX)).expect("tbf");
        assert_eq!(tbf.rate_bytes, 1_250_000);
        assert_eq!(tbf.burst_bytes, 536_870_911);
        assert_eq!(tbf.limit_bytes, 31_250 + 536_870_911);
        // 429.5 s of sending, in 64 ns ticks, does not fit: saturated (the
        // kernel uses TCA_TBF_BURST instead).
        assert_eq!(tbf.buffer_ticks(), u32::MAX);
        let small = Tbf::from_bits(8_000, 32_000).expect("tbf");
        assert_eq!(
            small.buffer_ticks(),
            62_500_000,
            "4000 B at 1000 B/s is 4 s"
        );
        assert!(Tbf::from_bits(7, 1_000).is_err());
        assert!(Tbf::from_bits(1_000, 7).is_err());
    }

    #[test]
    fn attributes_are_tc_tbf_qopt_burst_and_rate64() {
        let tbf = Tbf::from_bits(8_000, 32_000).expect("tbf");
        let options: Vec<(u16, Vec<u8>)> = tbf.options().iter().map(emitted).collect();
        assert_eq!(options.len(), 2, "no RATE64 below 2^32 bytes/s");
        let (kind, parms) = &options[0];
        assert_eq!(*kind, TCA_TBF_PARMS);
        assert_eq!(parms.len(), 36);
        let u32_at =
            |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(parms[0], 0, "cell_log");
        assert_eq!(parms[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(u32_at(parms, 8), 1_000, "rate in bytes/s");
        assert!(parms[12..24].iter().all(|b| *b == 0), "no peak rate");
        assert_eq!(u32_at(parms, 24), 25 + 4_000, "limit");
        assert_eq!(u32_at(parms, 28), 62_500_000, "buffer in ticks");
        assert_eq!(u32_at(parms, 32), 0, "mtu");
        assert_eq!(options[1], (TCA_TBF_BURST, 4_000u32.to_ne_bytes().to_vec()));

        // 1 Pbit/s: the 32-bit field saturates and RATE64 carries it.
        let fast = Tbf::from_bits(1_000_000_000_000_000, 8_000_000).expect("tbf");
        let options: Vec<(u16, Vec<u8>)> = fast.options().iter().map(emitted).collect();
        assert_eq!(u32_at(&options[0].1, 8), u32::MAX);
        assert_eq!(
            options[1],
            (
                TCA_TBF_RATE64,
                125_000_000_000_000u64.to_ne_bytes().to_vec()
            )
        );
        assert_eq!(options[2].0, TCA_TBF_BURST);
    }
}
