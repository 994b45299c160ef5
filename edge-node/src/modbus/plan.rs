//! Read plan: which Modbus requests poll a device's register map, and how
//! often. Pure: no IO.

use schemas::registers::{RegisterFunction, RegisterSpec};

/// Most registers one read request may ask for (Modbus limit for 0x03/0x04).
pub(crate) const MAX_WORDS: u16 = 125;
/// Most bits one read request may ask for (Modbus limit for 0x01/0x02).
pub(crate) const MAX_BITS: u16 = 2000;

/// One read request covering contiguous registers of one unit and table that
/// share a poll period.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReadGroup {
    pub(crate) unit_id: u8,
    pub(crate) function: RegisterFunction,
    pub(crate) start: u16,
    /// Registers (or bits) read.
    pub(crate) count: u16,
    pub(crate) poll_ms: u64,
    /// Indexes into the device's register list, in address order.
    pub(crate) members: Vec<usize>,
}

impl ReadGroup {
    /// Short description for errors and logs (`holding 10..12 unit 1`).
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} {}..{} unit {}",
            function_name(self.function),
            self.start,
            u32::from(self.start) + u32::from(self.count),
            self.unit_id
        )
    }
}

pub(crate) fn function_name(f: RegisterFunction) -> &'static str {
    match f {
        RegisterFunction::Holding => "holding",
        RegisterFunction::Input => "input",
        RegisterFunction::Coil => "coil",
        RegisterFunction::Discrete => "discrete",
    }
}

fn width(r: &RegisterSpec) -> u16 {
    if r.function.is_bit() {
        1
    } else {
        r.data_type.words()
    }
}

/// Group registers into read requests: registers of one unit, function and
/// poll period whose addresses are exactly contiguous share a request, up to
/// the protocol's size limit. Gaps are never read (a gap may be an illegal
/// address on the device). Expects a validated map (no overlaps).
pub(crate) fn plan(registers: &[RegisterSpec]) -> Vec<ReadGroup> {
    let mut idx: Vec<usize> = (0..registers.len()).collect();
    idx.sort_by_key(|&i| {
        let r = &registers[i];
        (r.unit_id, function_name(r.function), r.poll_ms, r.address)
    });
    let mut groups: Vec<ReadGroup> = Vec::new();
    for i in idx {
        let r = &registers[i];
        let w = width(r);
        let limit = if r.function.is_bit() {
            MAX_BITS
        } else {
            MAX_WORDS
        };
        if let Some(g) = groups.last_mut()
            && g.unit_id == r.unit_id
            && g.function == r.function
            && g.poll_ms == r.poll_ms
            && u32::from(g.start) + u32::from(g.count) == u32::from(r.address)
            && u32::from(g.count) + u32::from(w) <= u32::from(limit)
        {
            g.count += w;
            g.members.push(i);
            continue;
        }
        groups.push(ReadGroup {
            unit_id: r.unit_id,
            function: r.function,
            start: r.address,
            count: w,
            poll_ms: r.poll_ms,
            members: vec![i],
        });
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::metrics::Unit;
    use schemas::registers::RegisterType;

    fn reg(name: &str, f: RegisterFunction, addr: u16, t: RegisterType, poll: u64) -> RegisterSpec {
        RegisterSpec {
            name: name.into(),
            unit_id: 1,
            function: f,
            address: addr,
            data_type: t,
            word_order: Default::default(),
            byte_order: Default::default(),
            scale: 1.0,
            offset: 0.0,
            unit: Unit::None,
            poll_ms: poll,
        }
    }

    #[test]
    fn contiguous_registers_share_a_request_gaps_and_periods_do_not() {
        use RegisterFunction::*;
        use RegisterType::*;
        let regs = vec![
            reg("a", Holding, 0, U16, 100),
            reg("b", Holding, 1, F32, 100), // 1..3
            reg("c", Holding, 3, I16, 100), // contiguous with b
            reg("d", Holding, 5, U16, 100), // gap at 4
            reg("e", Holding, 6, U16, 500), // other period
            reg("f", Coil, 0, Bool, 100),
            reg("g", Coil, 1, Bool, 100),
            reg("h", Input, 0, U16, 100),
        ];
        let p = plan(&regs);
        let find = |m: usize| p.iter().find(|g| g.members.contains(&m)).cloned();
        let g = find(0).unwrap();
        assert_eq!((g.start, g.count, g.members.clone()), (0, 4, vec![0, 1, 2]));
        assert_eq!(find(3).unwrap().count, 1);
        assert_ne!(find(3), find(4));
        let c = find(5).unwrap();
        assert_eq!((c.function, c.start, c.count), (Coil, 0, 2));
        assert_eq!(find(7).unwrap().function, Input);
        assert_eq!(p.len(), 5);
        // every register is in exactly one group
        let mut all: Vec<usize> = p.iter().flat_map(|g| g.members.clone()).collect();
        all.sort();
        assert_eq!(all, (0..regs.len()).collect::<Vec<_>>());
    }

    #[test]
    fn requests_respect_the_protocol_limit() {
        let regs: Vec<RegisterSpec> = (0..200)
            .map(|i| {
                reg(
                    &format!("r{i}"),
                    RegisterFunction::Holding,
                    i,
                    RegisterType::U16,
                    100,
                )
            })
            .collect();
        let p = plan(&regs);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|g| g.count <= MAX_WORDS));
        assert_eq!(p[0].count + p[1].count, 200);
    }
}
