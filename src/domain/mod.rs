//! The domain room: the pure core. The model, the event schema, the configuration, the state
//! fold (`evolve`) and every decision (`decide`). No I/O and no report formatting here.

pub mod clock;
pub mod config;
pub mod decide;
pub mod event;
pub mod input;
pub mod model;
pub mod state;
