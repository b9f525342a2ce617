-- mailgend's own objects live in schema `mailgend` and never alter
-- intelmq-mailgen's. This migration creates the schema and lets the
-- notification role use it; later migrations add the service's tables.

CREATE SCHEMA IF NOT EXISTS mailgend;
GRANT USAGE ON SCHEMA mailgend TO eventdb_send_notifications;
