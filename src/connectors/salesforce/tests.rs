//! Connector tests against the simulator.
