//! The v1 device cgroup, emulated (runc's `devices.Emulator`): the OCI
//! rules replayed in order, reduced to what they add up to, a default for
//! every device plus exceptions that all say the opposite. That is what the
//! v2 program checks, and it gives a container the same devices on v2 as on
//! v1.
//!
//! A rule of type `a` resets everything, whatever its numbers and access
//! say (the v1 kernel reads it so). A state starts as deny-all: rules that
//! do not begin with `a` start from the safe side, as runc's do on v2.

use std::collections::BTreeMap;
use std::fmt;

use super::{Access, DeviceRule, DeviceType, Node, Number};
use crate::executor::cgroups::CgroupError;

/// A device or a wildcard range of them; `None` numbers match any. Ordered
/// by major, minor, type with wildcards first, as runc orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Device {
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub node: Node,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}:{}",
            self.node.letter(),
            Number(self.major),
            Number(self.minor)
        )
    }
}

/// What a list of device rules adds up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default_allow: bool,
    /// Devices that get the opposite of the default for these accesses.
    exceptions: BTreeMap<Device, Access>,
}

impl Filter {
    pub fn deny_all() -> Filter {
        Filter {
            default_allow: false,
            exceptions: BTreeMap::new(),
        }
    }

    /// The rules replayed from deny-all. Fails where v1 would silently drop
    /// a rule (see [`Filter::apply`]).
    pub fn from_rules<'a>(
        rules: impl IntoIterator<Item = &'a DeviceRule>,
    ) -> Result<Filter, CgroupError> {
        let mut filter = Filter::deny_all();
        for rule in rules {
            filter.apply(rule)?;
        }
        Ok(filter)
    }

    /// One more rule, later rules overriding earlier ones. A rule that
    /// takes access back from part of a wildcard exception (`allow c *:*
    /// rwm` then `deny c 1:3 rwm`) is refused: v1 ignores it, and a v2
    /// program would enforce what v1 does not, so either way the container
    /// would not get what the rules seem to say.
    pub fn apply(&mut self, rule: &DeviceRule) -> Result<(), CgroupError> {
        let node = match rule.typ {
            DeviceType::All => {
                *self = Filter {
                    default_allow: rule.allow,
                    exceptions: BTreeMap::new(),
                };
                return Ok(());
            }
            DeviceType::Block => Node::Block,
            DeviceType::Char => Node::Char,
        };
        let device = Device {
            major: rule.major,
            minor: rule.minor,
            node,
        };
        if rule.allow != self.default_allow {
            let access = self.exceptions.entry(device).or_default();
            *access = access.union(rule.access);
            return Ok(());
        }
        let wider = [
            Device {
                major: None,
                ..device
            },
            Device {
                minor: None,
                ..device
            },
            Device {
                major: None,
                minor: None,
                ..device
            },
        ];
        for wide in wider.into_iter().filter(|w| *w != device) {
            if let Some(access) = self.exceptions.get(&wide)
                && !access.intersection(rule.access).is_empty()
            {
                let verb = |allow| if allow { "allow" } else { "deny" };
                return Err(CgroupError::InvalidResource {
                    what: "device rule".to_string(),
                    reason: format!(
                        "{} {rule} would cut a hole in the earlier {} {wide} {access}, which cgroup v1 ignores; list the devices to {} instead",
                        verb(rule.allow),
                        verb(!rule.allow),
                        verb(!rule.allow),
                    ),
                });
            }
        }
        if let Some(access) = self.exceptions.get_mut(&device) {
            *access = access.difference(rule.access);
            if access.is_empty() {
                self.exceptions.remove(&device);
            }
        }
        Ok(())
    }

    /// Whether a device no exception names may be used.
    pub fn default_allow(&self) -> bool {
        self.default_allow
    }

    /// Every device, every access: no program needed.
    pub fn is_allow_all(&self) -> bool {
        self.default_allow && self.exceptions.is_empty()
    }

    /// The exceptions in a fixed order; each is the opposite of the
    /// default, for the accesses given.
    pub fn exceptions(&self) -> impl Iterator<Item = (Device, Access)> + '_ {
        self.exceptions.iter().map(|(d, a)| (*d, *a))
    }

    /// The v1 kernel's answer (`devcgroup_legacy_check_permission`), the
    /// reference the program is tested against: on deny-all one exception
    /// must allow every access asked for; on allow-all an exception that
    /// shares any access denies.
    #[cfg(test)]
    pub fn allows(&self, node: Node, major: u32, minor: u32, access: Access) -> bool {
        let mut matching = self.exceptions().filter(|(d, _)| {
            d.node == node
                && d.major.is_none_or(|m| m == major)
                && d.minor.is_none_or(|m| m == minor)
        });
        if self.default_allow {
            !matching.any(|(_, a)| !a.intersection(access).is_empty())
        } else {
            matching.any(|(_, a)| a.contains(access))
        }
    }
}

/// `deny all but c 1:3 rwm, c 136:* rwm`.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.default_allow {
            "allow all"
        } else {
            "deny all"
        })?;
        for (i, (device, access)) in self.exceptions().enumerate() {
            let sep = if i == 0 { " but " } else { ", " };
            write!(f, "{sep}{device} {access}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `allow c 1:3 rwm` style shorthand.
    fn r(line: &str) -> DeviceRule {
        let parts: Vec<&str> = line.split([' ', ':']).collect();
        let [verb, typ, major, minor, access] = parts[..] else {
            panic!("bad rule {line}");
        };
        let number = |n: &str| (n != "*").then(|| n.parse().expect("number"));
        DeviceRule {
            allow: verb == "allow",
            typ: match typ {
                "a" => DeviceType::All,
                "b" => DeviceType::Block,
                _ => DeviceType::Char,
            },
            major: number(major),
            minor: number(minor),
            access: Access::parse(access).expect("access"),
        }
    }

    fn filter(lines: &[&str]) -> Result<Filter, CgroupError> {
        let rules: Vec<DeviceRule> = lines.iter().map(|l| r(l)).collect();
        Filter::from_rules(&rules)
    }

    fn show(lines: &[&str]) -> String {
        filter(lines).expect("filter").to_string()
    }

    #[test]
    fn starts_from_deny_all() {
        assert_eq!(show(&[]), "deny all");
        assert_eq!(show(&["allow c 1:3 rwm"]), "deny all but c 1:3 rwm");
    }

    #[test]
    fn wildcard_type_resets_whatever_came_before() {
        assert_eq!(show(&["allow c 1:3 rwm", "allow a *:* rwm"]), "allow all");
        assert!(filter(&["allow a *:* rwm"]).expect("f").is_allow_all());
        // As the v1 kernel reads `a`: numbers and access are ignored.
        assert_eq!(show(&["deny b 8:0 w", "deny a 1:3 r"]), "deny all");
        assert_eq!(
            show(&["deny a *:* rwm", "allow c 1:3 rwm", "deny a *:* rwm"]),
            "deny all"
        );
    }

    #[test]
    fn containerd_defaults_reduce_to_sorted_exceptions() {
        let got = show(&[
            "deny a *:* rwm",
            "allow c *:* m",
            "allow b *:* m",
            "allow c 1:3 rwm",
            "allow c 1:8 rwm",
            "allow c 136:* rwm",
            "allow c 5:2 rwm",
            "allow c 10:200 rwm",
        ]);
        assert_eq!(
            got,
            "deny all but b *:* m, c *:* m, c 1:3 rwm, c 1:8 rwm, c 5:2 rwm, c 10:200 rwm, c 136:* rwm"
        );
    }

    #[test]
    fn same_device_merges_and_later_rules_take_back() {
        assert_eq!(
            show(&["deny a *:* rwm", "allow c 1:3 r", "allow c 1:3 w"]),
            "deny all but c 1:3 rw"
        );
        assert_eq!(
            show(&["deny a *:* rwm", "allow c 1:3 rwm", "deny c 1:3 w"]),
            "deny all but c 1:3 rm"
        );
        assert_eq!(
            show(&["deny a *:* rwm", "allow c 1:3 rwm", "deny c 1:3 rwm"]),
            "deny all"
        );
        // A deny of something never allowed is a no-op, as in v1.
        assert_eq!(show(&["deny a *:* rwm", "deny c 1:5 rwm"]), "deny all");
        assert_eq!(
            show(&[
                "allow a *:* rwm",
                "deny b 8:* w",
                "allow b 8:* w",
                "deny c 1:5 m"
            ]),
            "allow all but c 1:5 m"
        );
    }

    #[test]
    fn holes_in_wildcards_are_refused() {
        for (lines, want) in [
            (
                &["deny a *:* rwm", "allow c *:* rwm", "deny c 1:3 rwm"][..],
                "deny c 1:3 rwm would cut a hole in the earlier allow c *:* rwm",
            ),
            (
                &["deny a *:* rwm", "allow c 1:* r", "deny c 1:3 rw"][..],
                "deny c 1:3 rw would cut a hole in the earlier allow c 1:* r",
            ),
            (
                &["allow a *:* rwm", "deny b *:0 w", "allow b 8:0 w"][..],
                "allow b 8:0 w would cut a hole in the earlier deny b *:0 w",
            ),
        ] {
            let err = filter(lines).expect_err(want);
            assert!(err.to_string().contains(want), "{err}");
        }
        // Access the wildcard does not cover, or another type, is fine.
        assert_eq!(
            show(&["deny a *:* rwm", "allow c *:* m", "deny c 1:3 rw"]),
            "deny all but c *:* m"
        );
        assert_eq!(
            show(&["deny a *:* rwm", "allow b *:* rwm", "deny c 1:3 rwm"]),
            "deny all but b *:* rwm"
        );
    }

    #[test]
    fn reference_answers_follow_v1() {
        let f = filter(&["deny a *:* rwm", "allow c 1:* r", "allow c 1:3 rw"]).expect("f");
        let rw = Access::READ.union(Access::WRITE);
        assert!(f.allows(Node::Char, 1, 3, rw));
        assert!(f.allows(Node::Char, 1, 9, Access::READ));
        assert!(
            !f.allows(Node::Char, 1, 9, rw),
            "one exception must cover all"
        );
        assert!(!f.allows(Node::Block, 1, 3, Access::READ));
        let f = filter(&["allow a *:* rwm", "deny c 1:3 w"]).expect("f");
        assert!(f.allows(Node::Char, 1, 3, Access::READ));
        assert!(!f.allows(Node::Char, 1, 3, rw), "any shared access denies");
        assert!(f.allows(Node::Char, 1, 4, rw));
    }
}
