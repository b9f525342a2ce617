//! A decided group's [`Plan`]: the mails its rule produces, rendered.

use super::*;

/// A decided group: which rule fits and what it will produce.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(super) rule: Arc<Rule>,
    /// For table mails: where the main mail puts its data.
    pub(super) location: Option<DataLocation>,
    /// Every table mail (copies too) attaches its CSV: set by
    /// [`Plan::attached`] for a mail over the size limit.
    pub(super) attach_all: bool,
    pub(super) shared: Arc<Shared>,
}

impl Plan {
    /// `file#rule`, for logs.
    pub fn format_name(&self) -> &str {
        &self.rule.id
    }

    /// The `events` columns the lead must load.
    pub fn event_columns(&self) -> Vec<String> {
        action_event_columns(&self.rule.action)
    }

    /// Ticket numbers to draw: one for a table mail (copies reuse it), one
    /// per event for X-ARF.
    pub fn tickets_needed(&self, distinct_event_count: usize) -> usize {
        match &self.rule.action {
            Action::Xarf { .. } => distinct_event_count,
            Action::Table { .. } => 1,
            Action::Reject { .. } | Action::Continue => 0,
        }
    }

    /// What to do when a table mail is over the relay's limit (`None`
    /// for X-ARF: one event per mail cannot be made smaller).
    pub fn oversize(&self) -> Option<Oversize> {
        match &self.rule.action {
            Action::Table { oversize, .. } => Some(*oversize),
            _ => None,
        }
    }

    /// This plan with the CSV of every table mail (the main one and the
    /// copies) as the attachment `events.csv`: what an inline CSV over the
    /// size limit becomes before it is compressed or split.
    pub fn attached(&self) -> Plan {
        Plan {
            rule: self.rule.clone(),
            location: self.location.map(|_| DataLocation::Attachment),
            attach_all: true,
            shared: self.shared.clone(),
        }
    }

    /// Whether this plan sends X-ARF reports.
    pub fn is_xarf(&self) -> bool {
        matches!(self.rule.action, Action::Xarf { .. })
    }

    /// Where the main table mail puts its CSV (`None` for X-ARF).
    pub fn data_location(&self) -> Option<DataLocation> {
        self.location
    }

    /// The template this plan uses: a file name, or `None` when the
    /// format carries it inline.
    pub fn template_name<'g>(&'g self, group: &'g Group) -> Option<&'g str> {
        match self.template_choice() {
            TemplateChoice::Directive => Some(&group.key.template_name),
            TemplateChoice::Named(n) => Some(n),
            TemplateChoice::Inline(_) => None,
        }
    }

    fn template_choice(&self) -> &TemplateChoice {
        match &self.rule.action {
            Action::Table { template, .. } | Action::Xarf { template, .. } => template,
            Action::Reject { .. } | Action::Continue => &TemplateChoice::Directive,
        }
    }

    /// The mails for the group: the main mail first (marked sent), then
    /// the constituency copies; or one X-ARF mail per event.
    pub fn render(&self, cx: &RenderContext) -> Result<Vec<Notification>, RenderError> {
        let needed = self.tickets_needed(cx.events.len());
        if cx.tickets.len() != needed || needed == 0 {
            return Err(RenderError::Tickets {
                format: self.rule.id.clone(),
                needed,
                given: cx.tickets.len(),
            });
        }
        let (template, label) = self.load_template(cx)?;
        match &self.rule.action {
            Action::Table {
                table,
                copies: with_copies,
                ..
            } => {
                let location = self.location.unwrap_or(DataLocation::Inline);
                let csv = table.to_csv(cx.events);
                let ticket = &cx.tickets[0];
                let mut out = vec![
                    self.table_mail(cx, &template, &label, &csv, location, ticket, None, true)?
                ];
                if *with_copies {
                    let group_name = cx.group.key.aggregate_identifier.get("recipient_group");
                    for copy in &self.rule.scope.copies {
                        if group_name == Some(copy.recipient_group.as_str()) {
                            out.push(self.table_mail(
                                cx,
                                &template,
                                &label,
                                &csv,
                                if self.attach_all {
                                    DataLocation::Attachment
                                } else {
                                    copy.location
                                },
                                ticket,
                                Some(copy.recipients.clone()),
                                false,
                            )?);
                        }
                    }
                }
                Ok(out)
            }
            Action::Xarf { spec, .. } => {
                let domain = cx
                    .config
                    .xarf_reportdomain
                    .as_deref()
                    .unwrap_or(&cx.config.sender_domain);
                let user_agent = concat!("mailgend ", env!("CARGO_PKG_VERSION"));
                let mut out = Vec::with_capacity(cx.events.len());
                for (event, ticket) in cx.events.iter().zip(cx.tickets) {
                    let subs = self.substitutions(
                        cx.group,
                        DataLocation::Attachment,
                        &[("ticket_number", ticket.as_str())],
                    )?;
                    let (subject, body) =
                        template
                            .substitute(&subs)
                            .map_err(|source| RenderError::Template {
                                format: self.rule.id.clone(),
                                template: label.clone(),
                                source: Box::new(source),
                            })?;
                    let report_id = format!("{ticket}@{domain}");
                    let report = spec
                        .report(event, &cx.config.sender_address, &report_id, user_agent)
                        .map_err(|reason| RenderError::Xarf {
                            format: self.rule.id.clone(),
                            event: event.id,
                            reason,
                        })?;
                    out.push(Notification {
                        ticket: ticket.clone(),
                        recipient: cx.group.key.recipient_address.clone(),
                        envelope_to: None,
                        subject,
                        body,
                        attachments: vec![Attachment {
                            subtype: "plain".into(),
                            filename: "report.txt".into(),
                            disposition_attachment: false,
                            content: report,
                        }],
                        extra_headers: vec![
                            ("X-ARF".into(), "PLAIN".into()),
                            ("Auto-Submitted".into(), "auto-generated".into()),
                        ],
                        mark_sent: true,
                        covers: Some(vec![event.id]),
                    });
                }
                Ok(out)
            }
            Action::Reject { .. } | Action::Continue => {
                unreachable!("tickets_needed is 0 for reject and continue rules")
            }
        }
    }

    fn load_template(&self, cx: &RenderContext) -> Result<(Arc<Template>, String), RenderError> {
        let (name, label) = match self.template_choice() {
            TemplateChoice::Inline(t) => {
                return Ok((t.clone(), "(inline in the format file)".into()));
            }
            TemplateChoice::Directive => (
                cx.group.key.template_name.as_str(),
                format!("{:?}", cx.group.key.template_name),
            ),
            TemplateChoice::Named(n) => (n.as_str(), format!("{n:?}")),
        };
        cx.templates
            .get(name)
            .map(|t| (t, label.clone()))
            .map_err(|source| RenderError::Template {
                format: self.rule.id.clone(),
                template: label,
                source: Box::new(source),
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn table_mail(
        &self,
        cx: &RenderContext,
        template: &Template,
        label: &str,
        csv: &str,
        location: DataLocation,
        ticket: &Ticket,
        envelope_to: Option<Vec<String>>,
        mark_sent: bool,
    ) -> Result<Notification, RenderError> {
        let inline = location == DataLocation::Inline;
        let subs = self.substitutions(
            cx.group,
            location,
            &[
                ("ticket_number", ticket.as_str()),
                ("events_as_csv", if inline { csv } else { "" }),
            ],
        )?;
        let (subject, body) =
            template
                .substitute(&subs)
                .map_err(|source| RenderError::Template {
                    format: self.rule.id.clone(),
                    template: label.to_string(),
                    source: Box::new(source),
                })?;
        let attachments = if inline {
            Vec::new()
        } else {
            vec![Attachment {
                subtype: "csv".into(),
                filename: "events.csv".into(),
                disposition_attachment: true,
                content: csv.to_string(),
            }]
        };
        Ok(Notification {
            ticket: ticket.clone(),
            recipient: cx.group.key.recipient_address.clone(),
            envelope_to,
            subject,
            body,
            attachments,
            extra_headers: Vec::new(),
            mark_sent,
            covers: None,
        })
    }

    /// The substitutions of one mail: the format's variables, its computed
    /// variables, the aggregate keys, and the tool's own variables, each
    /// later layer winning over the earlier ones.
    fn substitutions(
        &self,
        group: &Group,
        location: DataLocation,
        tool: &[(&str, &str)],
    ) -> Result<Substitutions, RenderError> {
        let scope = &self.rule.scope;
        let agg = &group.key.aggregate_identifier;
        // What computed variables may refer to.
        let mut env = scope.variables.clone();
        for (k, v) in agg.iter() {
            env.insert(k.to_string(), v.to_string());
        }
        for (k, v) in tool {
            env.insert(k.to_string(), v.to_string());
        }
        let mut subs = scope.variables.clone();
        for (name, c) in &scope.computed {
            let text = match c {
                Computed::Text(t) => t,
                Computed::FirstOf { cases, otherwise } => cases
                    .iter()
                    .find(|(key, _)| agg.get(key).is_some())
                    .map(|(_, t)| t)
                    .unwrap_or(otherwise),
                Computed::ByLocation { inline, attachment } => match location {
                    DataLocation::Inline => inline,
                    DataLocation::Attachment => attachment,
                },
            };
            let value =
                text.substitute(&env, Part::Text)
                    .map_err(|source| RenderError::Variable {
                        format: self.rule.id.clone(),
                        variable: name.clone(),
                        source: Box::new(source),
                    })?;
            subs.insert(name.clone(), value);
        }
        for (k, v) in agg.iter() {
            subs.insert(k.to_string(), v.to_string());
        }
        for (k, v) in tool {
            if agg.get(k).is_some() && !self.shared.clash_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "aggregate_identifier has a key named like mailgend's own variable `{k}`; \
                     templates get mailgend's value (intelmq-mailgen let the aggregate key win); \
                     logged once"
                );
            }
            subs.insert(k.to_string(), v.to_string());
        }
        Ok(subs)
    }
}
