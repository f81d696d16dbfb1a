//! STUB (being written).
pub struct Engine;
pub struct EngineCore;
pub struct RequestOutput;
