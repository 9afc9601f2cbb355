// The one place that includes the PKCS#11 header (p11-kit's, PKCS#11 2.40 names).
#pragma once
#include <p11-kit/pkcs11.h>
