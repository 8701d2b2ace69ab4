//! The node's side of the directory server (`vmsync-directory`): joining,
//! asking for promotion, reporting staleness bitmaps, and answering the
//! directory's request to demote.

pub mod client;

pub use client::{
    answer_demote, DirError, DirInfo, DirectoryClient, Grant, Member, PrevReport, Report,
};
