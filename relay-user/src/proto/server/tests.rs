//! Server state-machine tests.
