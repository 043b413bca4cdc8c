-- Who exists: partners, vendors, the resources they book out, and the API keys that act for them.
-- Minutes (not ms) here because vendors configure calendars in minutes; the engine converts.

CREATE TABLE partners (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vendors (
    id                     text PRIMARY KEY,
    unit_minutes           integer NOT NULL DEFAULT 15
                           CHECK (unit_minutes > 0 AND 1440 % unit_minutes = 0),
    buffer_before_minutes  integer NOT NULL DEFAULT 0 CHECK (buffer_before_minutes >= 0),
    buffer_after_minutes   integer NOT NULL DEFAULT 0 CHECK (buffer_after_minutes >= 0),
    confirmation_required  boolean NOT NULL DEFAULT true,
    payment_required       boolean NOT NULL DEFAULT false,
    timezone               text NOT NULL DEFAULT 'UTC',
    created_at             timestamptz NOT NULL DEFAULT now()
);

-- `key` is a compact integer identity so the bookings exclusion constraint can use the
-- core int8range GiST opclass instead of needing the btree_gist extension for text.
CREATE TABLE resources (
    key                    bigserial NOT NULL UNIQUE,
    id                     text PRIMARY KEY,
    vendor_id              text NOT NULL REFERENCES vendors (id),
    unit_minutes           integer NOT NULL CHECK (unit_minutes > 0 AND 1440 % unit_minutes = 0),
    buffer_before_minutes  integer NOT NULL CHECK (buffer_before_minutes >= 0),
    buffer_after_minutes   integer NOT NULL CHECK (buffer_after_minutes >= 0),
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX resources_vendor_idx ON resources (vendor_id);

-- Keys are looked up by their public prefix and verified against the digest; the plaintext
-- key is never stored (the length check refuses anything shorter than a real digest).
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    prefix      text NOT NULL UNIQUE,
    digest      text NOT NULL CHECK (length(digest) >= 32),
    role        text NOT NULL CHECK (role IN ('partner', 'vendor', 'ops', 'admin', 'system')),
    partner_id  text REFERENCES partners (id),
    vendor_id   text REFERENCES vendors (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CONSTRAINT api_keys_partner_role_has_partner CHECK (role <> 'partner' OR partner_id IS NOT NULL),
    CONSTRAINT api_keys_vendor_role_has_vendor CHECK (role <> 'vendor' OR vendor_id IS NOT NULL)
);
