//! Playbook YAML → [`super::Playbook`] (not written yet).
