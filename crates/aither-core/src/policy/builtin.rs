//! The shipped policies, compiled in so that `aitherctl run` works before `install.sh` has
//! copied them to /etc/aither/policies. Installed files of the same name take precedence.

pub const BUILTIN_POLICIES: &[(&str, &str)] = &[
    ("strict", include_str!("../../../../policies/strict.toml")),
    (
        "strict-full",
        include_str!("../../../../policies/strict-full.toml"),
    ),
    (
        "standard",
        include_str!("../../../../policies/standard.toml"),
    ),
    ("ci", include_str!("../../../../policies/ci.toml")),
    (
        "permissive",
        include_str!("../../../../policies/permissive.toml"),
    ),
    ("gpu", include_str!("../../../../policies/gpu.toml")),
];
