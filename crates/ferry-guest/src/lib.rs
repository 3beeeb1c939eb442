//! The workload tool of Ferry's test guest, usable as a library on the host.
//!
//! # On disk
//! A *records file* is a sequence of self-describing records (see
//! [`record`] for the byte layout): a versioned magic number, a sequence
//! number counting from 0, the file's seed, the record length, a crc32c,
//! and a payload that is a pseudo-random function of seed and sequence
//! number. The writer ([`writer::Writer`]) appends one record at a time and
//! calls `fdatasync` before it reports the record as *acknowledged* (a
//! `record` event on the serial console, see [`event`]).
//!
//! # What a crash can leave
//! Every acknowledged record is whole. After the last acknowledged record
//! there may be a *torn tail*: part of a record whose write was in flight,
//! or zeros where the file size reached the disk before the data. Anything
//! else — a damaged record followed by valid ones, a gap or repeat in the
//! sequence, a record of another file, fewer records than were
//! acknowledged — is corruption, and [`verify`] reports it.
//!
//! # Recovery
//! On start the writer verifies the file, refuses to append to a damaged
//! one, cuts a torn tail (making the cut durable) and continues with the
//! next sequence number. On the host, [`image::verify_image`] replays the
//! ext4 journal on a copy of a raw disk image and verifies the file in it.

pub mod error;
pub mod event;
pub mod image;
pub mod record;
pub mod verify;
pub mod writer;

pub use error::{Error, ErrorKind};
pub use verify::Report;
