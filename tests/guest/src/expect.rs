//! What the host started the devices with, from `/etc/svmgpu-expect` (written into the
//! initramfs by scripts/run-vm.sh): `key=value` lines.

use std::collections::BTreeMap;

pub const EXPECT_PATH: &str = "/etc/svmgpu-expect";

#[derive(Debug, Default)]
pub struct Expect(BTreeMap<String, String>);

impl Expect {
    pub fn load() -> Self {
        Self::parse(&std::fs::read_to_string(EXPECT_PATH).unwrap_or_default())
    }

    pub fn parse(text: &str) -> Self {
        Expect(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    /// A numeric value (decimal or 0x hex).
    pub fn num(&self, key: &str) -> Option<u64> {
        let v = self.0.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_hex() {
        let e = Expect::parse("gpus=2\nmask=0x200000\nbad\n");
        assert_eq!(e.num("gpus"), Some(2));
        assert_eq!(e.num("mask"), Some(0x20_0000));
        assert_eq!(e.num("bad"), None);
        assert_eq!(e.num("missing"), None);
    }
}
