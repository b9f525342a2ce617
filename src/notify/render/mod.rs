//! Render: one mail's text from a format's template and the group's
//! events ([`template`]), with the events as a CSV or text table
//! ([`table`]) where the template asks for one.

pub mod table;
pub mod template;
